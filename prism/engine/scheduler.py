"""Continuous batching for one model: which sequences run this step, with how many tokens.

Policy only (no torch): running sequences go first (decodes and unfinished prefill chunks),
then waiting prefills fill what is left of the per-step token budget (chunked prefill). When
KV pages run out, the most recently admitted sequence is preempted and recomputed later
rather than anything failing. The cross-model, SLO-aware order comes from the device's local
scheduler (a later layer); this class only forms batches.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from prism.config import EngineConfig
from prism.engine.block_manager import BlockManager
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan
from prism.types import FinishReason, SeqStatus


# Picks whom to preempt among candidates (running, not yet scheduled this step). The device's
# local scheduler supplies an SLO-aware one; the default takes the most recently admitted.
VictimChooser = Callable[[list[Sequence]], Sequence]


def newest_first(candidates: list[Sequence]) -> Sequence:
    return candidates[-1]


class _WouldPreempt(Exception):
    """Room for a running sequence needs a preemption, and preemption is not allowed now."""


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager,
                 choose_victim: VictimChooser | None = None, max_model_len: int | None = None):
        self.config = config
        self.max_model_len = max_model_len
        self.blocks = block_manager
        self.choose_victim = choose_victim or newest_first
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is preempted first
        self.num_preemptions = 0
        self.admission_paused = False  # set while the model drains before an eviction

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def unfinished(self) -> list[Sequence]:
        """Running sequences first, then waiting ones in queue order."""
        return list(self.running) + list(self.waiting)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def schedule(self, allow_preempt: bool = True, budget: int | None = None) -> StepPlan | None:
        """The next step's plan. With `allow_preempt=False` (a step is in flight and its
        tokens are not read yet, core.py), None when the plan would need a preemption.
        `budget`: this step's tokens, below max_num_batched_tokens (the device's local
        scheduler keeps running decodes within their TPOT so); None: max_num_batched_tokens."""
        try:
            return self._schedule(allow_preempt, budget)
        except _WouldPreempt:
            return None

    def _awaits_last_token(self, seq: Sequence) -> bool:
        """Its pending tokens (steps in flight) already reach its length limit: nothing more
        to compute, its end comes when they are read."""
        if not seq.num_pending:
            return False
        limit = self.max_model_len
        return seq.num_output_tokens >= seq.params.max_tokens or (limit is not None and seq.num_tokens >= limit)

    def _schedule(self, allow_preempt: bool, limit: int | None = None) -> StepPlan:
        budget = self.config.max_num_batched_tokens if limit is None else \
            max(1, min(limit, self.config.max_num_batched_tokens))
        # Under a given budget a running prefill chunk leaves a token for each running decode
        # not yet scheduled, so a small budget never skips a decode.
        decodes_left = 0 if limit is None else sum(s.num_uncomputed_tokens == 1 for s in self.running)
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()

        for seq in list(self.running):
            if budget == 0:
                break
            uncomputed = seq.num_uncomputed_tokens
            is_decode = uncomputed == 1
            decodes_left -= is_decode and limit is not None
            if seq.status != SeqStatus.RUNNING or self._awaits_last_token(seq):  # preempted earlier in this loop, or done
                continue
            room = budget if limit is None or is_decode else budget - decodes_left
            if room <= 0:
                continue
            num = min(uncomputed, room)
            has_slots = self.blocks.has_slots(seq, seq.num_computed_tokens + num)
            if not has_slots and not self._grow_or_preempt(seq, num, preempted, scheduled, allow_preempt):
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
            scheduled.add(id(seq))
            budget -= num

        # New prefills only when nothing had to be preempted: admitting work while evicting
        # other work would thrash.
        while self.waiting and budget > 0 and not preempted and not self.admission_paused:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            num = min(seq.num_uncomputed_tokens, budget)
            # Leave one block per running sequence so their next decodes do not preempt.
            reserve = len(self.running)
            if not self.blocks.can_allocate(seq, seq.num_computed_tokens + num, reserve):
                break
            if not self.blocks.allocate(seq, seq.num_computed_tokens + num):
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
            budget -= num
        return StepPlan(tuple(chunks), tuple(preempted))

    def _grow_or_preempt(
        self, seq: Sequence, num: int, preempted: list[Sequence], scheduled: set[int], allow_preempt: bool = True,
    ) -> bool:
        """Make room for seq's next `num` tokens, preempting the newest others if needed.
        False when seq itself had to be preempted."""
        target = seq.num_computed_tokens + num
        while not self.blocks.allocate(seq, target):
            if not allow_preempt:
                raise _WouldPreempt
            candidates = [s for s in self.running if id(s) not in scheduled]
            victim = self.choose_victim(candidates) if candidates else seq
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop its KV, keep its tokens, put it back at the queue head."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def preempt_all(self) -> list[Sequence]:
        """Drop every running sequence's KV (model eviction); all of them wait again."""
        victims = list(self.running)
        for seq in reversed(victims):  # appendleft in reverse keeps their order at the head
            self._preempt(seq)
        return victims

    def reorder_waiting(self, req_ids: list[str]) -> None:
        """Put the named waiting sequences first, in that order (the device's admission
        order); any others keep their relative order behind them."""
        rank = {r: i for i, r in enumerate(req_ids)}
        self.waiting = deque(sorted(self.waiting, key=lambda s: rank.get(s.req_id, len(rank))))

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.is_finished:
            return
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def commit(self, plan: StepPlan) -> None:
        """The step ran: advance what each chunk computed (sampled tokens are added by the
        engine, which also decides when a sequence finishes)."""
        for chunk in plan.chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
