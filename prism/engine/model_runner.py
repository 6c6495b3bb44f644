"""Turns a step plan into a device batch, runs the model and samples.

Data flows one way: StepPlan (small, per step) -> DeviceBatch (tensors) -> sampled token ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prism.engine.attention import AttentionMetadata
from prism.engine.kv_cache import PagedKVCache
from prism.engine.llama import LlamaModel
from prism.engine.sampler import make_generator, sample
from prism.engine.sequence import Sequence, StepPlan


@dataclass
class DeviceBatch:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states that are sampled
    sampled_seqs: list[Sequence]


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: PagedKVCache, device: torch.device):
        self.model = model
        self.kv = kv
        self.device = device
        self._generators: dict[str, torch.Generator | None] = {}

    def prepare(self, plan: StepPlan) -> DeviceBatch:
        lay = self.kv.layout
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, context_lens, tables, logits_rows, sampled = [], [], [], [], []
        for chunk in plan.chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            ids += seq.token_ids(start, start + n)
            positions += range(start, start + n)
            for pos in range(start, start + n):
                block = seq.block_table[pos // lay.block_size]
                page, block_in_page = divmod(block, lay.blocks_per_page)
                slots.append(page * lay.tokens_per_page + block_in_page * lay.block_size + pos % lay.block_size)
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(seq.block_table)
            if chunk.samples:
                logits_rows.append(len(ids) - 1)
                sampled.append(seq)
        meta = self._metadata(slots, query_lens, context_lens, tables)
        return DeviceBatch(
            input_ids=self._tensor(ids, torch.long),
            positions=self._tensor(positions, torch.long),
            meta=meta,
            logits_indices=self._tensor(logits_rows, torch.long),
            sampled_seqs=sampled,
        )

    def _metadata(self, slots, query_lens, context_lens, tables) -> AttentionMetadata:
        lay = self.kv.layout
        max_blocks = max((len(t) for t in tables), default=0)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.long),
            block_tables=self._tensor(padded, torch.int32),
            context_lens=self._tensor(context_lens, torch.int32),
            query_start_loc=self._tensor(starts, torch.int32),
            query_lens_host=query_lens,
            context_lens_host=context_lens,
            block_tables_host=[list(t) for t in tables],
            block_size=lay.block_size,
            blocks_per_page=lay.blocks_per_page,
            max_query_len=max(query_lens, default=0),
            max_context_len=max(context_lens, default=0),
        )

    def _tensor(self, data, dtype) -> torch.Tensor:
        # Small per-step tensors: a direct copy is cheaper than pinning host memory each time.
        return torch.tensor(data, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[tuple[Sequence, int]]:
        """Run one step; returns (sequence, sampled token) for each sequence that samples."""
        batch = self.prepare(plan)
        hidden = self.model.forward(batch.input_ids, batch.positions, batch.meta, self.kv)
        if not batch.sampled_seqs:
            return []
        logits = self.model.logits(hidden[batch.logits_indices])
        params = [s.params for s in batch.sampled_seqs]
        gens = [self._generator(s) for s in batch.sampled_seqs]
        tokens = sample(logits, params, gens).tolist()
        return list(zip(batch.sampled_seqs, tokens))

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
