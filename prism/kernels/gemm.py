"""A Triton GEMM for the engine's projections: out = x @ weight.T (+ bias) (+ residual).

Weights are row-major [N, K] as torch's Linear stores them; x is [..., K]; fp32 accumulation,
output in x's dtype. Two things cuBLAS's F.linear does not give the engine:

- a residual added in the epilogue (o_proj and down_proj outputs go straight into the
  residual stream), so the projection's output is never written and read back on its own;
- a config chosen per (shape, rows) from a measured table (benchmarks/gemm_shapes.py), since
  at decode (a handful of rows) the weight read is the whole cost and the best tiling differs
  from prefill's.

Split-K: with few rows there are too few (M, N) tiles to fill the chip, so each tile's K range
is cut into `split_k` pieces run by separate programs. Each piece stores its fp32 partial
sum; the last piece to finish a tile (a per-tile arrival counter) adds all partials in split
order (deterministic, whoever arrives last), runs the epilogue and resets the counter, so the
whole GEMM stays one launch and is replayable inside a CUDA graph.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from prism.kernels import fix_interpreter_scalars

# Programs of one launch (all M, N tiles) re-visit GROUP_M row tiles before moving along N,
# so a weight tile read from memory is reused from L2 by the row tiles of its group.
GROUP_M = 8


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration. `split_k` pieces per tile (1: no split)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}"
                f"w{self.num_warps}p{self.num_stages}")

    @classmethod
    def parse(cls, text: str) -> GemmConfig:
        """The inverse of str(): configs travel as short strings in benchmark JSON."""
        found = re.fullmatch(r"m(\d+)n(\d+)k(\d+)s(\d+)w(\d+)p(\d+)", text)
        if found is None:
            raise ValueError(f"not a GEMM config: {text!r}")
        return cls(*(int(v) for v in found.groups()))


@triton.jit
def _epilogue(acc, out_ptr, res_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_rm,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    if HAS_BIAS:  # added to the fp32 sum, as cuBLAS's bias epilogue does
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if HAS_RESIDUAL:
        # Round the product to the model dtype first, then add in float32 and round again:
        # the bits of the reference's residual + F.linear(...) (written out in float32, which
        # is what a bf16 add compiles to; the interpreter would add bf16 bit patterns).
        r = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y, mask=mask)


@triton.jit(do_not_specialize=["M", "k_tiles_per_split"])
def _gemm_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, bias_ptr, partial_ptr, count_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, stride_rm, k_tiles_per_split,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    tile = tl.program_id(0)
    piece = tl.program_id(1)
    num_pieces = tl.num_programs(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * tiles_n
    first_m = (tile // per_group) * GROUP
    group_rows = tl.minimum(tiles_m - first_m, GROUP)
    pid_m = first_m + (tile % per_group) % group_rows
    pid_n = (tile % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M and columns past N read valid (wrapped) rows instead of masking every load;
    # their results are never stored.
    rm_in = rm % M
    rn_in = rn % N
    first_k_tile = piece * k_tiles_per_split
    num_k_tiles = tl.minimum(k_tiles_per_split, tl.cdiv(K, BLOCK_K) - first_k_tile)
    rk = first_k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm_in[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn_in[:, None] * stride_wn + rk[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, num_k_tiles):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            in_k = (rk + i * BLOCK_K < K)[None, :]
            a = tl.load(x_ptrs, mask=in_k, other=0.0)
            b = tl.load(w_ptrs, mask=in_k, other=0.0)
        if DOT_FP32:  # the Triton 3.6 interpreter multiplies bfloat16 as raw uint16 bits
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SPLIT:
        in_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_partials = partial_ptr + tile.to(tl.int64) * num_pieces * BLOCK_M * BLOCK_N
        tl.store(tile_partials + piece * BLOCK_M * BLOCK_N + in_tile, acc)
        # One thread counts the arrival: the barrier orders every thread's partial stores
        # before it, and acq_rel (gpu scope) publishes them to the last arrival and makes
        # the others' partials visible to it (CUTLASS's serial split-K semaphore).
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == num_pieces - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for p in range(0, num_pieces):  # split order, so the sum does not depend on timing
                acc += tl.load(tile_partials + p * BLOCK_M * BLOCK_N + in_tile, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + tile, 0)  # ready for the next launch (or graph replay)
            _epilogue(acc, out_ptr, res_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_rm,
                      HAS_BIAS, HAS_RESIDUAL)
    else:
        _epilogue(acc, out_ptr, res_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_rm,
                  HAS_BIAS, HAS_RESIDUAL)


# Per-tile arrival counters of the split-K path, one zeroed buffer per (device, stream): the
# last piece of each tile sets its counter back to zero, so the buffer stays zero between
# launches. Per stream, because launches on two streams may overlap.
_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _counters(device: torch.device, num_tiles: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    held = _COUNTERS.get(key)
    if held is None or held.numel() < num_tiles:
        held = torch.zeros(max(num_tiles, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = held
    return held


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; an H100's count where there is none (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def default_config(m: int, n: int, k: int, sms: int = 132) -> GemmConfig:
    """A reasonable config with no measurements: tiles as small in M as the rows allow, and
    split-K until the programs fill the chip (two per multiprocessor for small tiles, whose
    loads alone would not keep the memory busy; one for large ones). A piece must read at
    least four times the bytes of its fp32 partial (stored once, read back once), so a split
    never costs more traffic than a quarter of what it spreads."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = 64 if m <= 64 else 128
    block_k = 128 if m <= 64 else 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    target = sms * (2 if block_m <= 64 else 1)
    k_tiles = triton.cdiv(k, block_k)
    partial_bytes = 2 * 4 * block_m * block_n
    min_k_tiles = max(4, triton.cdiv(4 * partial_bytes, 2 * (block_m + block_n) * block_k))
    split = 1
    while tiles * split < target and k_tiles // (split * 2) >= min_k_tiles:
        split *= 2
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return GemmConfig(block_m, block_n, block_k, split, warps, 4 if m <= 64 else 3)


def linear(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
    config: GemmConfig | None = None, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ bias) (+ residual), in x's dtype. x: [..., K]; weight: [N, K];
    residual: [..., N]. `out` may be `residual` itself (each element is read before it is
    written by the same program), which makes the residual add in place."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {k}")
    if weight.dtype != x.dtype or weight.stride(-1) != 1:
        raise ValueError("weight must be row-major [N, K] in x's dtype")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty((*lead, n), dtype=x.dtype, device=x.device)
    for name, t in (("out", out), ("residual", residual)):
        if t is not None and (t.shape != (*lead, n) or t.dtype != x.dtype or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {x.dtype} tensor of shape {(*lead, n)}")
    out2 = out.view(-1, n)
    res2 = residual.view(-1, n) if residual is not None else out2
    if m == 0:
        return out
    cfg = config or default_config(m, n, k, num_sms(x.device))
    k_tiles = triton.cdiv(k, cfg.block_k)
    per_split = triton.cdiv(k_tiles, cfg.split_k)
    pieces = triton.cdiv(k_tiles, per_split)  # no empty pieces
    num_tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    interpret = x.device.type == "cpu"  # CPU tensors run in Triton's interpreter
    if interpret:
        fix_interpreter_scalars()
    if pieces > 1:
        partials = torch.empty(num_tiles * pieces * cfg.block_m * cfg.block_n, dtype=torch.float32, device=x.device)
        counts = _counters(x.device, num_tiles)
    else:
        partials = counts = out2  # unused without SPLIT
    _gemm_kernel[(num_tiles, pieces)](
        x2, weight, out2, res2, bias if bias is not None else out2, partials, counts,
        m, n, k, x2.stride(0), weight.stride(0), out2.stride(0), res2.stride(0), per_split,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, SPLIT=pieces > 1,
        EVEN_K=k % cfg.block_k == 0, PRECISION="ieee" if x.dtype == torch.float32 or interpret else "tf32",
        DOT_FP32=interpret,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP=GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


class ConfigTable:
    """Measured choices for the engine: per weight shape (N, K), a list of (up to this many
    rows, the config to use, or None where cuBLAS was as fast). Built from the cases of a
    benchmarks/gemm_shapes.py result; a shape or row count past the table gets None."""

    def __init__(self, rows: dict[tuple[int, int], list[tuple[int, GemmConfig | None]]]):
        self.rows = {shape: sorted(choices, key=lambda c: c[0]) for shape, choices in rows.items()}

    def lookup(self, m: int, n: int, k: int) -> GemmConfig | None:
        for max_rows, config in self.rows.get((n, k), ()):
            if m <= max_rows:
                return config
        return None

    @classmethod
    def from_cases(cls, cases: list[dict], min_gain: float = 0.05) -> ConfigTable:
        """`cases`: dicts with n, k, m, cublas_us, best_us, best_config (the result JSON's);
        Triton is chosen where it is at least `min_gain` faster than cuBLAS."""
        rows: dict[tuple[int, int], list[tuple[int, GemmConfig | None]]] = {}
        for case in cases:
            wins = case.get("best_config") and case["best_us"] < (1 - min_gain) * case["cublas_us"]
            config = GemmConfig.parse(case["best_config"]) if wins else None
            rows.setdefault((case["n"], case["k"]), []).append((case["m"], config))
        return cls(rows)
