"""Piecewise CUDA graphs for steps that carry prefill tokens (mixed and prefill steps).

A step with prefill chunks cannot be one graph: attention over a varying set of sequences
needs per-step metadata (query and context lengths, tiles) that a graph cannot take. But
everything between two attention calls depends only on the number of tokens: norms, the
GEMMs, RoPE and the KV store, the MLP. Those pieces (llama.py: first_piece, middle_piece,
last_piece) are captured once per token-count bucket, and a step replays them with the
attention kernels launched eagerly in between, as vLLM's piecewise graphs do. A step of a
few dozen tokens otherwise pays hundreds of kernel launches from Python.

Pieces read and write static buffers: token ids, positions and KV slots in; each layer's q
(and the residual stream) out; the attention output in. A step of n tokens runs in the
smallest bucket that holds it; its padding rows get KV slot -1 (nothing stored) and are never
attended nor sampled.

Without CUDA (`capture=False`, tests on CPU) the same pieces run eagerly over the same static
buffers, so the buffer and padding logic is checked where CI runs.
"""
from __future__ import annotations

import torch

from prism.engine.attention import AttentionMetadata
from prism.engine.kv_cache import PagedKVCache
from prism.engine.llama import LlamaModel

DEFAULT_BUCKETS = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def token_buckets(max_tokens: int) -> list[int]:
    """The bucket sizes up to max_tokens (padding wastes under half a step's GEMM rows)."""
    return [b for b in DEFAULT_BUCKETS if b <= max_tokens] or [max_tokens]


class MixedGraphs:
    def __init__(self, model: LlamaModel, kv: PagedKVCache, device: torch.device, max_tokens: int,
                 pool=None, capture: bool = True):
        """`pool`: the graph memory pool (None: a new one); `capture=False` runs the pieces
        eagerly (CPU tests)."""
        self.model = model
        self.kv = kv
        self.device = device
        self.buckets = token_buckets(max_tokens)
        self.max_tokens = self.buckets[-1]
        c, n = model.config, self.buckets[-1]
        dtype = model.embed.dtype
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.q = torch.zeros(n, c.num_heads, c.head_dim, dtype=dtype, device=device)
        self.o = torch.zeros(n, c.q_size, dtype=dtype, device=device)
        self.h = torch.zeros(n, c.hidden_size, dtype=dtype, device=device)
        self.x = torch.zeros(n, c.hidden_size, dtype=dtype, device=device)
        self._capture = capture
        self._pool = pool
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}

    def fits(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.max_tokens

    def bucket_for(self, num_tokens: int) -> int:
        return next(b for b in self.buckets if b >= num_tokens)

    # ---- the pieces over static buffers -----------------------------------------------------
    def _meta(self, bucket: int) -> AttentionMetadata:
        """What the pieces read of the metadata: the KV slots (qkv_to_cache stores K and V)."""
        lay = self.kv.layout
        return AttentionMetadata(slot_mapping=self.slots[:bucket], block_tables=self.slots[:0],
                                 context_lens=self.slots[:0], query_start_loc=self.slots[:0],
                                 query_lens_host=[], context_lens_host=[], block_tables_host=[],
                                 block_size=lay.block_size, blocks_per_page=lay.blocks_per_page)

    def _pieces(self, bucket: int) -> list:
        """The pieces of one bucket as functions of the static buffers, in replay order."""
        m, kv, meta = self.model, self.kv, self._meta(bucket)
        ids, pos = self.input_ids[:bucket], self.positions[:bucket]
        q, o, h, x = self.q[:bucket], self.o[:bucket], self.h[:bucket], self.x[:bucket]

        def first():
            _store(m.first_piece(ids, pos, meta, kv), (q, h))

        def middle(n):
            return lambda: _store(m.middle_piece(n, o, h, pos, meta, kv), (q, h))

        def last():
            _store((m.last_piece(o, h),), (x,))

        return [first] + [middle(n) for n in range(1, len(m.layers))] + [last]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket's pieces, largest first (so the pool is sized once)."""
        if not self._capture:
            return
        pool = self._pool if self._pool is not None else torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for bucket in reversed(self.buckets):
            graphs = []
            for piece in self._pieces(bucket):
                with torch.cuda.stream(stream):
                    piece()  # warm-up: compiles kernels, no allocation in capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    piece()
                graphs.append(graph)
            self._graphs[bucket] = graphs
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    # ---- a step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of one step (fits(num_tokens)): the pieces
        replayed, the attention between them launched with the step's own metadata."""
        n = input_ids.shape[0]
        bucket = self.bucket_for(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        if n < bucket:  # padding rows: no KV stored, never attended, never sampled
            self.slots[n:bucket].fill_(-1)
        pieces = self._graphs[bucket] if self._capture else self._pieces(bucket)
        for layer, piece in enumerate(pieces):
            if self._capture:
                piece.replay()
            else:
                piece()
            if layer < len(self.model.layers):
                self.o[:n].copy_(self.model.attention(layer, self.q[:n], meta, self.kv))
        return self.x[:n]


def _store(outputs: tuple, buffers: tuple) -> None:
    """Copy a piece's outputs into their static buffers (a fused op may already have written
    the residual in place: then there is nothing to copy)."""
    for out, buf in zip(outputs, buffers):
        if out.data_ptr() != buf.data_ptr():
            buf.copy_(out)
