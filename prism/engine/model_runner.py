"""Turns a step plan into a device batch, runs the model and samples.

Data flows one way: StepPlan (small, per step) -> HostBatch (lists) -> device tensors, or the
static buffers of a captured CUDA graph for a pure decode step -> sampled token ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from prism.engine.attention import AttentionMetadata
from prism.engine.cuda_graph import DecodeGraphs, HostDecodeBatch, shared_pool
from prism.engine.piecewise_graphs import MixedGraphs
from prism.engine.grammar_mask import apply_grammar_masks
from prism.engine.kv_cache import PagedKVCache
from prism.engine.llama import LlamaModel
from prism.engine.sampler import LogprobsOnDevice, compute_logprobs, make_generator, sample
from prism.engine.sequence import SampledToken, Sequence, StepPlan
from prism.engine.transfer import HostResult, device_tensor, padded_block_tables, to_host_async

VECTORIZE_ABOVE = 16  # chunks longer than this compute their slots with numpy

# On CUDA an eager step with prefill pads its rows to a multiple of this (padding rows store no
# KV and are never attended nor sampled). cuBLAS picks its kernel by the row count, and the
# first launch of a kernel in the process waits for everything queued on the device (measured:
# benchmarks/first_use_waits.py), which with overlap stalls the host for a whole step. With
# padded row counts, startup can launch every GEMM shape that steps will meet (launch_every_gemm).
EAGER_ROW_MULTIPLE = 32


@dataclass
class HostBatch:
    """One step's inputs as host lists (built without touching the device)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)  # rows of the hidden states sampled
    sampled_seqs: list[Sequence] = field(default_factory=list)
    # Rows whose input token is pending (sampled by the step in flight), and their sequences.
    pending_rows: list[int] = field(default_factory=list)
    pending_seqs: list[Sequence] = field(default_factory=list)

    @property
    def is_decode(self) -> bool:
        """Every row is one token that samples (a 1-token prefill chunk may not sample)."""
        return len(self.sampled_seqs) == len(self.query_lens) and all(n == 1 for n in self.query_lens)


@dataclass
class InFlightStep:
    """A launched step: its tokens (and logprobs) on their way to the host."""

    seqs: list[Sequence]  # the sampled rows' sequences, in row order
    tokens: torch.Tensor | None  # on the device: the next step's pending inputs come from here
    host_tokens: torch.Tensor | None  # pinned, filled when `ready`
    logprobs: LogprobsOnDevice | None
    ready: HostResult

    def row_of(self) -> dict[int, int]:
        return {id(seq): row for row, seq in enumerate(self.seqs)}


@dataclass
class DeviceBatch:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states that are sampled
    sampled_seqs: list[Sequence]


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: PagedKVCache, device: torch.device,
                 stream: torch.cuda.Stream | None = None):
        """A tensor-parallel model (`model.tp`) gives every rank the whole vocabulary's
        logits; greedy rows then agree by construction, and rank 0's tokens are broadcast
        when a batch samples at random. `stream`: the CUDA stream of this model's steps
        (None: the current one), so that several models' steps can run at the same time."""
        self.model = model
        self.kv = kv
        self.device = device
        self.stream = stream
        self._generators: dict[str, torch.Generator | None] = {}
        self.eager_row_multiple = 1  # EAGER_ROW_MULTIPLE once launch_every_gemm ran (CUDA)
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None

    def capture_graphs(self, max_batch: int, max_tokens: int, max_model_len: int, private_pool: bool = False) -> None:
        """Capture CUDA graphs (CUDA fast path only): decode batches up to `max_batch`, and
        pieces of steps with prefill up to `max_tokens` tokens (0: none of that kind).
        `private_pool`: their memory is not shared with other models' graphs (which may then
        replay at the same time)."""
        from prism.kernels.decode_attention import num_splits_for

        pool = torch.cuda.graph_pool_handle() if private_pool else shared_pool(self.device)
        if max_batch > 0:
            kv_heads = self.model.config.num_kv_heads
            self.graphs = DecodeGraphs(self.model, self.kv, self.device, max_batch, max_model_len,
                                       lambda b: num_splits_for(b, kv_heads), pool)
            self.graphs.capture()
        if max_tokens > 0 and self.model.tp is None:  # collectives stay out of graphs
            self.mixed_graphs = MixedGraphs(self.model, self.kv, self.device, max_tokens, pool)
            self.mixed_graphs.capture()

    # ---- batch building ----------------------------------------------------------------------
    def host_batch(self, plan: StepPlan) -> HostBatch:
        lay = self.kv.layout
        bs, bpp, tpp = lay.block_size, lay.blocks_per_page, lay.tokens_per_page
        hb = HostBatch()
        for chunk in plan.chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            if n == 1:  # a decode: most rows of most steps
                hb.input_ids.append(seq.token_at(start))
                hb.positions.append(start)
                hb.slots.append(_slot(seq.block_table, start, bs, bpp, tpp))
            else:
                hb.input_ids += seq.token_ids(start, start + n)
                hb.positions += range(start, start + n)
                hb.slots += _chunk_slots(seq.block_table, start, n, bs, bpp, tpp)
            hb.query_lens.append(n)
            hb.context_lens.append(start + n)
            hb.block_tables.append(seq.block_table)
            if chunk.samples:
                hb.logits_rows.append(len(hb.input_ids) - 1)
                hb.sampled_seqs.append(seq)
            if seq.num_pending and start + n == seq.num_tokens:  # ends with the token in flight
                hb.pending_rows.append(len(hb.input_ids) - 1)
                hb.pending_seqs.append(seq)
        return hb

    def prepare(self, plan: StepPlan) -> DeviceBatch:
        return self.to_device(self.host_batch(plan))

    def to_device(self, hb: HostBatch, row_multiple: int = 1) -> DeviceBatch:
        """The step's tensors; `row_multiple`: its token rows padded to a multiple of this
        (the padding stores no KV: slot -1)."""
        lay = self.kv.layout
        starts = np.concatenate([[0], np.cumsum(hb.query_lens, dtype=np.int64)]).tolist()
        pad = -len(hb.input_ids) % row_multiple
        meta = AttentionMetadata(
            slot_mapping=self._tensor(hb.slots + [-1] * pad, torch.long),
            block_tables=self._tensor(padded_block_tables(hb.block_tables), torch.int32),
            context_lens=self._tensor(hb.context_lens, torch.int32),
            query_start_loc=self._tensor(starts, torch.int32),
            query_lens_host=hb.query_lens,
            context_lens_host=hb.context_lens,
            block_tables_host=[list(t) for t in hb.block_tables],
            block_size=lay.block_size,
            blocks_per_page=lay.blocks_per_page,
            max_query_len=max(hb.query_lens, default=0),
            max_context_len=max(hb.context_lens, default=0),
        )
        return DeviceBatch(
            input_ids=self._tensor(hb.input_ids + [0] * pad, torch.long),
            positions=self._tensor(hb.positions + [0] * pad, torch.long),
            meta=meta,
            logits_indices=self._tensor(hb.logits_rows, torch.long),
            sampled_seqs=hb.sampled_seqs,
        )

    def _tensor(self, data, dtype) -> torch.Tensor:
        # Queued, not synchronous: building this step must not wait for the one in flight.
        return device_tensor(data, dtype, self.device)

    def _pending_inputs(self, hb: HostBatch, after: InFlightStep | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, tokens): the input tokens that the step in flight samples, on the device."""
        if not hb.pending_rows:
            return None
        if after is None or after.tokens is None:
            raise RuntimeError("a pending input token without the step that samples it")
        row_of = after.row_of()
        source = self._tensor([row_of[id(seq)] for seq in hb.pending_seqs], torch.long)
        return self._tensor(hb.pending_rows, torch.long), after.tokens.index_select(0, source)

    # ---- running -----------------------------------------------------------------------------
    def _graph_fits(self, hb: HostBatch) -> bool:
        return self.graphs is not None and hb.is_decode and len(hb.query_lens) <= self.graphs.max_batch

    def _sampled_hidden(self, hb: HostBatch, pending: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Hidden states of the rows that sample (a decode batch samples every row)."""
        if self._graph_fits(hb):
            return self.graphs.run(HostDecodeBatch(
                hb.input_ids, hb.positions, hb.slots, hb.context_lens, hb.block_tables), pending)
        graphs = self.mixed_graphs is not None and self.mixed_graphs.fits(len(hb.input_ids))
        # Eager decode steps stay unpadded: the decode kernels take one row per sequence.
        pad = not graphs and max(hb.query_lens) > 1
        batch = self.to_device(hb, self.eager_row_multiple if pad else 1)
        if pending is not None:
            batch.input_ids.index_copy_(0, *pending)
        if graphs:
            hidden = self.mixed_graphs.run(batch.input_ids, batch.positions, batch.meta)
        else:
            hidden = self.model.forward(batch.input_ids, batch.positions, batch.meta, self.kv)
        return hidden[batch.logits_indices]

    @torch.inference_mode()
    def execute(self, plan: StepPlan, while_gpu_runs: Callable[[], None] | None = None
                ) -> list[SampledToken]:
        """Run one step; returns (sequence, sampled token, its logprobs if asked) for each
        sequence that samples.
        `while_gpu_runs` is called once the step is queued on the device and before waiting
        for its tokens: host work placed there overlaps the GPU's."""
        step = self.launch(plan, None)
        if while_gpu_runs is not None:
            while_gpu_runs()
        return self.collect(step)

    @torch.inference_mode()
    def launch(self, plan: StepPlan, after: InFlightStep | None) -> InFlightStep:
        """Queue one step (forward and sampling) and start copying its tokens to the host;
        returns without waiting. `after`: the step in flight whose tokens are this plan's
        pending inputs."""
        if self.stream is None:
            return self._launch(plan, after)
        # After whatever the device's default stream holds (weights copied in on activation).
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            return self._launch(plan, after)

    def _launch(self, plan: StepPlan, after: InFlightStep | None) -> InFlightStep:
        hb = self.host_batch(plan)
        hidden = self._sampled_hidden(hb, self._pending_inputs(hb, after))
        if not hb.sampled_seqs:
            return InFlightStep([], None, None, None, HostResult(self.device))
        logits = apply_grammar_masks(self.model.logits(hidden), hb.sampled_seqs)  # structured output
        params = [s.params for s in hb.sampled_seqs]
        gens = [self._generator(s) for s in hb.sampled_seqs]
        history = [(s.prompt_token_ids, s.output_token_ids) for s in hb.sampled_seqs] \
            if any(p.uses_penalties for p in params) else None
        tokens = sample(logits, params, gens, history)
        tp = self.model.tp
        if tp is not None and not all(p.greedy for p in params):
            tokens = tp.broadcast(tokens)
        logprobs = compute_logprobs(logits, params, tokens)  # after the broadcast: of the tokens kept
        if logprobs is not None:
            logprobs.start_host_copy()
        host_tokens = to_host_async(tokens)
        return InFlightStep(hb.sampled_seqs, tokens, host_tokens, logprobs, HostResult(self.device))

    @staticmethod
    def is_done(step: InFlightStep) -> bool:
        """Whether a launched step's tokens are on the host, without waiting."""
        return step.ready.query()

    def collect(self, step: InFlightStep) -> list[SampledToken]:
        """Wait for a launched step's tokens."""
        if not step.seqs:
            return []
        step.ready.wait()
        token_list = step.host_tokens.tolist()
        lps = step.logprobs.to_host(len(token_list)) if step.logprobs is not None else [None] * len(token_list)
        return [SampledToken(s, t, lp) for s, t, lp in zip(step.seqs, token_list, lps)]

    @property
    def largest_graph_tokens(self) -> int:
        """Steps with prefill up to this many tokens replay piecewise graphs; larger ones run
        eagerly (0: every one does)."""
        return self.mixed_graphs.max_tokens if self.mixed_graphs is not None else 0

    @torch.inference_mode()
    def launch_every_gemm(self, max_sampled_rows: int, max_eager_tokens: int) -> None:
        """Launch once each GEMM shape that steps outside CUDA graphs can meet: the LM head at
        every number of sampled rows up to `max_sampled_rows`, the blocks' projections at
        every padded row count of an eager step with prefill up to `max_eager_tokens`; then
        pad eager steps (EAGER_ROW_MULTIPLE). Nothing is queued yet, so the first launches'
        waits cost nothing here."""
        m, step = self.model, EAGER_ROW_MULTIPLE
        first = self.largest_graph_tokens + 1
        eager_rows = range(-(-first // step) * step, max_eager_tokens + step, step)
        projections = m.projections()
        widest = max(w.shape[1] for w, _ in projections)
        scratch = torch.zeros(max(max_sampled_rows, eager_rows.stop), widest, dtype=m.embed.dtype, device=self.device)
        hidden = scratch[:, : m.lm_head.shape[1]]
        for rows in range(1, max_sampled_rows + 1):
            F.linear(hidden[:rows], m.lm_head)
        for rows in eager_rows:
            for weight, bias in projections:
                F.linear(scratch[:rows, : weight.shape[1]], weight, bias)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.eager_row_multiple = step

    @torch.inference_mode()
    def logits_for(self, plan: StepPlan) -> torch.Tensor:
        """Logits of every token the plan computes (for scoring, profiling and tests)."""
        batch = self.prepare(plan)
        hidden = self.model.forward(batch.input_ids, batch.positions, batch.meta, self.kv)
        return self.model.logits(hidden)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.req_id not in self._generators:
            self._generators[seq.req_id] = make_generator(seq.params.seed, self.device)
        return self._generators[seq.req_id]

    def forget(self, seq: Sequence) -> None:
        self._generators.pop(seq.req_id, None)


def _chunk_slots(block_table: list[int], start: int, n: int, bs: int, bpp: int, tpp: int) -> list[int]:
    """KV slots of positions [start, start + n): (page, slot in page) flattened."""
    if n > VECTORIZE_ABOVE:
        pos = np.arange(start, start + n)
        block = np.asarray(block_table, dtype=np.int64)[pos // bs]
        return ((block // bpp) * tpp + (block % bpp) * bs + pos % bs).tolist()
    return [_slot(block_table, p, bs, bpp, tpp) for p in range(start, start + n)]


def _slot(block_table: list[int], pos: int, bs: int, bpp: int, tpp: int) -> int:
    """The KV slot of position `pos`: its block's page times tokens per page, plus its place there."""
    block = block_table[pos // bs]
    return (block // bpp) * tpp + (block % bpp) * bs + pos % bs
