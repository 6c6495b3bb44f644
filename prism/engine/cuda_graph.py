"""CUDA graphs of the decode forward pass, one per batch-size bucket.

A decode step of a small batch is hundreds of short kernels; launched one by one from Python
the CPU, not the GPU, sets the pace. A graph replays them all with one launch. Graphs bake in
addresses, and Prism's addresses are fixed: weights and KV live in elastic arenas whose
virtual ranges never move, so a graph captured once stays valid across eviction and
activation (it is only replayed while the weights are mapped). Inputs go through static
buffers; a batch is padded up to its bucket with rows of context 0 and KV slot -1, which the
kernels skip (no KV stored, attention output 0).

The graphs of a device's models share one memory pool: they replay one at a time on one
stream and each step reads its output before the next replay, so their transient tensors
may overlap (the pieces of mixed steps, piecewise_graphs.py, share it too). A model whose
steps run on a stream of its own (EngineConfig.own_stream) has a pool of its own: its
replays may run beside other models'.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prism.engine.attention import AttentionMetadata
from prism.engine.kv_cache import PagedKVCache
from prism.engine.llama import LlamaModel
from prism.engine.transfer import padded_block_tables

_POOLS: dict[torch.device, tuple] = {}


def shared_pool(device: torch.device):
    """The graph memory pool of a device's models that replay one at a time."""
    if device not in _POOLS:
        _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 (padding wastes at most 15 rows), up to max_batch."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


@dataclass
class HostDecodeBatch:
    """One decode step's inputs, on the host."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv: PagedKVCache, device: torch.device, max_batch: int,
                 max_model_len: int, decode_splits, pool):
        self.model = model
        self.kv = kv
        self.device = device
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        lay = kv.layout
        max_blocks = -(-max_model_len // lay.block_size)
        b = self.max_batch
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slots = torch.full((b,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(b, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((b, max_blocks), dtype=torch.int32, device=device)
        self._decode_splits = decode_splits
        self._pool = pool
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _meta(self, bucket: int) -> AttentionMetadata:
        lay = self.kv.layout
        return AttentionMetadata(
            slot_mapping=self.slots[:bucket],
            block_tables=self.block_tables[:bucket],
            context_lens=self.context_lens[:bucket],
            query_start_loc=torch.arange(bucket + 1, dtype=torch.int32, device=self.device),
            query_lens_host=[1] * bucket, context_lens_host=[], block_tables_host=[],
            block_size=lay.block_size, blocks_per_page=lay.blocks_per_page,
            max_query_len=1, decode_splits=self._decode_splits(bucket),
        )

    def _forward(self, bucket: int, meta: AttentionMetadata) -> torch.Tensor:
        return self.model.forward(self.input_ids[:bucket], self.positions[:bucket], meta, self.kv)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (so the shared pool is sized once)."""
        pool = self._pool
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for bucket in reversed(self.buckets):
            meta = self._meta(bucket)
            with torch.cuda.stream(stream):
                self._forward(bucket, meta)  # warm-up: compiles kernels, no allocation in capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self._forward(bucket, meta)
            self._graphs[bucket] = (graph, out)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    @torch.inference_mode()
    def run(self, host: HostDecodeBatch, pending: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states [batch, hidden] of one decode step (batch <= max_batch). `pending`:
        (rows, tokens) of input tokens already on the device (sampled by the step before)."""
        n = len(host.input_ids)
        bucket = self.bucket_for(n)
        graph, out = self._graphs[bucket]
        tables = torch.from_numpy(padded_block_tables(host.block_tables))
        width = tables.shape[1]
        ints = torch.tensor([host.input_ids, host.positions, host.slots], dtype=torch.long)
        self.input_ids[:n].copy_(ints[0], non_blocking=True)
        self.positions[:n].copy_(ints[1], non_blocking=True)
        self.slots[:n].copy_(ints[2], non_blocking=True)
        self.context_lens[:n].copy_(torch.tensor(host.context_lens, dtype=torch.int32), non_blocking=True)
        self.block_tables[:n, :width].copy_(tables, non_blocking=True)
        if pending is not None:
            self.input_ids.index_copy_(0, *pending)
        if n < bucket:  # padding rows: store nothing, attend to nothing
            self.slots[n:bucket].fill_(-1)
            self.context_lens[n:bucket].zero_()
        graph.replay()
        return out[:n]
