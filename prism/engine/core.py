"""One model's request lifecycle, written once for the real engine and the simulator.

The core owns the requests (by id), the batch `Scheduler`, the `BlockManager` over the
executor's KV pages and the `OutputProcessor`; an `Executor` (executor.py) owns memory and
the forward pass. A step: schedule -> the executor runs the plan (mapping the next step's KV
pages while it runs) -> commit -> tokens to events and finished outputs -> trim free pages.
`LLMEngine` is a core over the device executor; the simulator's engines are cores over the
simulated executor. Torch-free.

Overlap (vLLM v1's async scheduling, SGLang's overlap scheduler): with an executor that can
queue a step without waiting (`supports_overlap`), a step schedules and launches step n+1
before it reads step n's tokens, so the host's work (scheduling, batch building, stop checks)
runs while the device computes. Each sequence that step n samples holds a PENDING output
until its token is read; step n+1 takes that token on the device. Results stay exact: a
sequence that step n ends (EOS, a stop token) may have computed one more token in n+1, which
is dropped, and its freed KV blocks are only written by steps queued after n+1. The host
waits for step n first (no overlap for that step) where it needs step n's tokens to plan
n+1: a preemption (recompute needs every token), structured output (the grammar's next
mask), penalties (the token history).
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Callable

import msgspec

from prism.config import EngineConfig
from prism.engine.block_manager import BlockManager
from prism.engine.executor import Executor, ModelSizes, context_limit
from prism.engine.memory_plan import KVGeometry, check_prompt_fits, max_kv_blocks
from prism.engine.output_processor import OutputProcessor, TokenEvent
from prism.engine.scheduler import Scheduler, VictimChooser
from prism.engine.sequence import SampledToken, Sequence, StepPlan
from prism.engine.structured import GrammarCompiler, compiler_for
from prism.sched.view import SLO
from prism.types import CompletionOutput, FinishReason, RequestError, SamplingParams, SeqStatus

if TYPE_CHECKING:
    from prism.engine.tokenizer import Tokenizer

LOOKAHEAD_WAITING = 64  # waiting requests looked at when guessing the next step's KV needs


class EngineCore:
    def __init__(self, executor: Executor, engine_config: EngineConfig, clock: Callable[[], float],
                 choose_victim: VictimChooser | None = None, tokenizer: Tokenizer | None = None,
                 eos_token_ids: tuple[int, ...] = (), detokenize: bool = True):
        """`tokenizer` turns text prompts into ids (None: token ids only); `detokenize=False`
        streams token ids without text (a server's frontend detokenizes and applies stop
        strings). `eos_token_ids` end a request unless its params ignore EOS."""
        self.executor = executor
        self.model_id = executor.model_id
        self.engine_config = engine_config
        self.clock = clock
        self.tokenizer = tokenizer
        g = executor.kv_geometry
        self.blocks = BlockManager(g.num_virtual_pages, g.blocks_per_page, g.block_size, executor.kv_mapper)
        self.max_model_len = context_limit(engine_config, executor.config)
        self.scheduler = Scheduler(engine_config, self.blocks, choose_victim, self.max_model_len)
        self.overlap = engine_config.overlap and getattr(executor, "supports_overlap", False)
        self._in_flight: object | None = None  # the launched step whose tokens are unread (overlap)
        self._in_flight_seqs: list[Sequence] = []  # the sequences it samples
        self._finished_early: list[CompletionOutput] = []  # read outside step(): returned by the next
        self.outputs = OutputProcessor(tokenizer if detokenize else None, eos_token_ids, self.max_model_len)
        self.last_plan: StepPlan | None = None
        self.last_step_num_tokens = 0  # tokens the last step computed (for cost accounting)
        self._requests: dict[str, Sequence] = {}  # unfinished requests by id
        self._events: list[TokenEvent] = []
        self._req_counter = itertools.count()

    @property
    def sizes(self) -> ModelSizes:
        return self.executor.sizes

    @property
    def kv_geometry(self) -> KVGeometry:
        return self.executor.kv_geometry

    # ---- requests --------------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], params: SamplingParams = SamplingParams(),
        req_id: str | None = None, arrival_time: float | None = None,
        slo: SLO | None = None, priority: int = 0,
    ) -> str:
        seq = self.make_sequence(prompt, params, req_id, arrival_time, slo, priority)
        self.outputs.add(seq)
        self.scheduler.add(seq)
        self._requests[seq.req_id] = seq
        return seq.req_id

    def make_sequence(self, prompt, params, req_id=None, arrival_time=None, slo=None, priority=0) -> Sequence:
        """Validate a request and build its sequence, without queueing it."""
        token_ids = self._prompt_ids(prompt)
        self._check_fits(len(token_ids))
        params.check_vocabulary(self.sizes.vocab_size)
        req_id = req_id or f"{self.model_id}-{next(self._req_counter)}"
        if req_id in self._requests:
            raise RequestError(f"request id {req_id!r} is already in use")
        arrival = self.clock() if arrival_time is None else arrival_time
        seq = Sequence(req_id, token_ids, params, arrival, slo=slo, priority=priority)
        if params.grammar is not None:
            seq.grammar = self._grammar_compiler().state(params.grammar)
        return seq

    def _grammar_compiler(self) -> GrammarCompiler:
        if self.tokenizer is None:
            raise RequestError(f"model {self.model_id} has no tokenizer: structured output needs one")
        return compiler_for(self.tokenizer, self.sizes.vocab_size)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"model {self.model_id} has no tokenizer: send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.sizes.vocab_size
        bad = _first_out_of_vocabulary(ids, vocab)
        if bad is not None:
            raise RequestError(f"token id {bad!r} is outside the vocabulary (0..{vocab - 1})")
        return ids

    def _check_fits(self, num_prompt_tokens: int) -> None:
        ex = self.executor
        max_blocks = max_kv_blocks(self.blocks, ex.kv_geometry.pages_per_kv_page, ex.budget_pages,
                                   ex.sizes.weight_pages)
        check_prompt_fits(self.model_id, num_prompt_tokens, self.max_model_len, self.blocks, max_blocks)

    def abort(self, req_id: str) -> CompletionOutput | None:
        seq = self._requests.get(req_id)
        return None if seq is None else self._finish(seq, FinishReason.ABORT, self.clock())

    def has_request(self, req_id: str) -> bool:
        return req_id in self._requests

    def sequence(self, req_id: str) -> Sequence | None:
        return self._requests.get(req_id)

    def first_token_time(self, req_id: str) -> float | None:
        """When an unfinished request got its first token (None: not yet, or not here)."""
        seq = self._requests.get(req_id)
        return None if seq is None else seq.first_token_time

    def sequences(self) -> list[Sequence]:
        """Every unfinished request: running ones first, then waiting in queue order."""
        return self.scheduler.unfinished()

    # ---- the batch, as the device sees it ---------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None or bool(self._finished_early)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @staticmethod
    def is_running(seq: Sequence) -> bool:
        """Admitted (holds KV blocks), as opposed to waiting."""
        return seq.status is SeqStatus.RUNNING

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def admission_paused(self) -> bool:
        return self.scheduler.admission_paused

    def pause_admission(self, paused: bool) -> None:
        """While paused, no waiting request is admitted (running ones go on)."""
        self.scheduler.admission_paused = paused

    def reorder_waiting(self, req_ids: list[str]) -> None:
        """Admit the named waiting requests first, in that order (the device's order)."""
        self.scheduler.reorder_waiting(req_ids)

    # ---- stepping --------------------------------------------------------------------------
    def step(self, budget: int | None = None) -> list[CompletionOutput]:
        """Run one batch; return the requests that finished (token events: drain_events). With
        overlap, the batch is launched and the previous one's tokens are read. `budget`: this
        step's tokens (Scheduler.schedule; None: max_num_batched_tokens)."""
        if self.overlap:
            return self._step_overlapped(budget)
        finished = self.take_finished_early() + self.read_in_flight()  # overlap was just turned off
        plan = self._schedule(allow_preempt=True, budget=budget)
        if plan.is_empty:
            return finished
        sampled = self.executor.execute(plan, lambda: self.blocks.map_ahead(self._blocks_for_next_step(plan)))
        self.scheduler.commit(plan)
        return finished + self._after_step(self._process_tokens(sampled, self.clock()))

    def _step_overlapped(self, budget: int | None = None) -> list[CompletionOutput]:
        finished = self.take_finished_early()
        if self._in_flight is not None and any(map(_needs_host_token, self._in_flight_seqs)):
            finished += self.read_in_flight()
        plan = self._schedule(allow_preempt=self._in_flight is None, budget=budget)
        if plan is None:  # room needs a preemption, which needs every token read first
            finished += self.read_in_flight()
            plan = self._schedule(allow_preempt=True, budget=budget)
        if plan.is_empty:
            return finished + self.read_in_flight()
        previous = self._in_flight
        self._in_flight = self.executor.launch(plan, previous)
        self._in_flight_seqs = [c.seq for c in plan.chunks if c.samples]
        next_blocks = self._blocks_for_next_step(plan)  # before the pending places change num_tokens
        self.scheduler.commit(plan)
        for seq in self._in_flight_seqs:
            seq.add_pending()
        self.blocks.map_ahead(next_blocks)
        if previous is not None:
            finished += self._process_tokens(self._collect(previous), self.clock())
        return self._after_step(finished)

    def _schedule(self, allow_preempt: bool, budget: int | None = None) -> StepPlan | None:
        plan = self.scheduler.schedule(allow_preempt, budget)
        if plan is None:
            return None
        self.last_plan = plan
        self.last_step_num_tokens = plan.num_tokens
        if not plan.is_empty:
            if not self.resident:  # the model's memory is unmapped
                raise RuntimeError(f"{self.model_id} is evicted: activate it before stepping")
            now = self.clock()
            for chunk in plan.chunks:
                if chunk.seq.admitted_time is None:
                    chunk.seq.admitted_time = now
        return plan

    def _after_step(self, finished: list[CompletionOutput]) -> list[CompletionOutput]:
        if not self.scheduler.has_work:
            self.blocks.map_ahead(0)  # idle: keep no pages for a next step that may not come
        self.blocks.trim()
        return finished

    def _collect(self, step: object) -> list[SampledToken]:
        """A launched step's tokens, less those of sequences that ended meanwhile."""
        return [s for s in self.executor.collect(step) if not s.seq.is_finished]

    @property
    def has_in_flight(self) -> bool:
        """A launched step's tokens are still unread (overlap)."""
        return self._in_flight is not None

    @property
    def in_flight_done(self) -> bool:
        """The launched step is over, or there is none: stepping now waits for nothing (a
        device whose models step at their own pace steps only such models)."""
        return self._in_flight is None or self.executor.is_done(self._in_flight)

    def read_in_flight(self) -> list[CompletionOutput]:
        """Wait for the step in flight and process its tokens; the requests it finished
        (nothing in flight: nothing). A device that runs another model's step next reads
        this one's meanwhile."""
        step = self._in_flight
        if step is None:
            return []
        self._in_flight, self._in_flight_seqs = None, []
        return self._process_tokens(self._collect(step), self.clock())

    def _settle(self) -> None:
        """Read the step in flight now (before eviction or close); its finished requests are
        returned by the next step()."""
        self._finished_early += self.read_in_flight()

    def take_finished_early(self) -> list[CompletionOutput]:
        """Requests that finished outside step() (read while evicting): the next step()
        returns them too, or whoever takes them here first."""
        finished, self._finished_early = self._finished_early, []
        return finished

    def _process_tokens(self, sampled: list[SampledToken], now: float) -> list[CompletionOutput]:
        finished = []
        for seq, token, logprobs in sampled:
            event = self.outputs.on_token(seq, token, now, logprobs)
            # A complete grammar ends the request as a stop (also on its max_tokens-th token).
            if seq.grammar is not None and event.finish_reason is not FinishReason.STOP and seq.grammar.advance(token):
                event = msgspec.structs.replace(event, finish_reason=FinishReason.STOP)
            self._events.append(event)
            if event.finish_reason is not None:
                finished.append(self._finish(seq, event.finish_reason, now))
        return finished

    def _blocks_for_next_step(self, plan: StepPlan) -> int:
        """KV blocks the step after `plan` will likely take: one per sequence whose next token
        starts a block, plus those of the prefill tokens the token budget lets in."""
        bs = self.blocks.block_size
        decodes = prefill = 0
        for chunk in plan.chunks:
            if chunk.samples:  # next step writes position num_tokens (this step's token)
                decodes += chunk.seq.num_tokens % bs == 0
            else:  # a chunked prefill goes on
                prefill += chunk.seq.num_tokens - chunk.start - chunk.num_tokens
        budget = self.engine_config.max_num_batched_tokens
        for seq in itertools.islice(self.scheduler.waiting, LOOKAHEAD_WAITING):
            if prefill >= budget:
                break
            prefill += seq.num_uncomputed_tokens
        return decodes + -(-min(prefill, budget) // bs)

    def _finish(self, seq: Sequence, reason: FinishReason, now: float) -> CompletionOutput:
        seq.drop_pending()
        tail, out = self.outputs.finish(seq, reason, now)
        if tail or reason == FinishReason.ABORT:
            self._events.append(TokenEvent(seq.req_id, -1, tail, now, reason))
        self.scheduler.finish(seq, reason)
        self._requests.pop(seq.req_id, None)
        self.executor.forget(seq)
        return out

    def drain_events(self) -> list[TokenEvent]:
        """Token events since the last call, in order (what a streaming client receives).
        An event with token_id -1 carries text flushed at the end, or an abort."""
        events, self._events = self._events, []
        return events

    # ---- residency -------------------------------------------------------------------------
    @property
    def resident(self) -> bool:
        return self.executor.weights_mapped

    @property
    def num_kv_pages(self) -> int:
        return self.executor.num_kv_pages

    def evict(self) -> list[Sequence]:
        """Unmap weights and all KV; every unfinished request is preempted (recomputed after
        activation). Returns the preempted sequences."""
        self._settle()
        preempted = self.scheduler.preempt_all()
        self.blocks.release_all_free_pages()
        self.executor.unmap_weights()
        return preempted

    def activate(self) -> None:
        """Map the weights again (same addresses) and copy them in."""
        if not self.resident:
            self.executor.activate()

    @property
    def has_host_copy(self) -> bool:
        return self.executor.has_host_copy

    def drop_host_copy(self) -> None:
        self.executor.drop_host_copy()

    # ---- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Abort what is unfinished and give every page back."""
        self._settle()
        for seq in self.sequences():
            self._finish(seq, FinishReason.ABORT, self.clock())
        self.blocks.release_all_free_pages()
        self.executor.close()


def _needs_host_token(seq: Sequence) -> bool:
    """Planning its next step needs its last token on the host."""
    return seq.grammar is not None or seq.params.uses_penalties


def _first_out_of_vocabulary(ids: list, vocab_size: int):
    """The first id that is not a token of the vocabulary, or None. Plain ints in range are
    checked at C speed first (prompts run to many thousand tokens in the simulator)."""
    if set(map(type, ids)) <= {int} and 0 <= min(ids) and max(ids) < vocab_size:
        return None
    return next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
