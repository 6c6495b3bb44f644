"""Attention kernel speed on the GPU, next to the dense bf16 matmul rate and PyTorch's SDPA.

Prefill: one prompt of `--tokens` tokens whose K/V sit in a paged cache (block ids shuffled
over the pages, as a running engine leaves them), through prism's Triton prefill kernel.
Checked against scaled_dot_product_attention(is_causal=True) on the same data (contiguous).
TFLOP/s count causal work only: 4 * heads * head_dim * n * (n + 1) / 2.

    python3 benchmarks/attention_kernels.py prefill --tokens 4096 --heads 32 --kv-heads 8 --head-dim 128
    python3 benchmarks/attention_kernels.py prefill --sweep   # also try other tile sizes
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200)


def matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.bfloat16) -> float:
    """Dense n x n x n matmul rate: the tensor-core yardstick of this GPU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _bench_ms(lambda: torch.matmul(a, b))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def paged_prefill_inputs(tokens: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
                         page_size: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """One prompt: q, dense k/v [tokens, kv_heads, head_dim], the paged caches holding them
    and the metadata the model runner builds for this step."""
    from prism.engine.attention import write_kv
    from prism.engine.kv_cache import KVLayout
    from prism.engine.model_runner import ModelRunner
    from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan
    from prism.types import SamplingParams

    gen = torch.Generator(device=device).manual_seed(seed)
    elem = torch.tensor([], dtype=dtype).element_size()
    block_bytes = block_size * kv_heads * head_dim * elem
    blocks_per_page = max(1, page_size // block_bytes)
    page_size = max(page_size, block_bytes)
    num_blocks = -(-tokens // block_size)
    num_pages = -(-num_blocks // blocks_per_page) + 1
    lay = KVLayout(block_size=block_size, blocks_per_page=blocks_per_page, num_virtual_pages=num_pages,
                   page_size=page_size, dtype=dtype, num_kv_heads=kv_heads, head_dim=head_dim)
    elems_per_page = page_size // elem

    def cache():  # the engine's strided layer view over one flat arena
        flat = torch.full((num_pages * elems_per_page,), float("nan"), dtype=dtype, device=device)
        return flat.as_strided((num_pages, lay.tokens_per_page, kv_heads, head_dim),
                               (elems_per_page, kv_heads * head_dim, head_dim, 1))

    k_cache, v_cache = cache(), cache()
    order = torch.randperm(num_pages * blocks_per_page, generator=torch.Generator().manual_seed(seed))
    seq = Sequence("bench", [0] * tokens, SamplingParams(max_tokens=1))
    seq.block_table = order[:num_blocks].tolist()
    meta = ModelRunner(None, SimpleNamespace(layout=lay), device).prepare(
        StepPlan((ScheduledChunk(seq, 0, tokens),))).meta
    q = torch.randn(tokens, heads, head_dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen, device=device, dtype=dtype)
    write_kv(k_cache, v_cache, k, v, meta)
    return q, k, v, k_cache, v_cache, meta


def bench_prefill(tokens: int = 4096, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                  block_size: int = 16, page_size: int = 2 << 20, dtype: torch.dtype = torch.bfloat16,
                  device: str = "cuda", sweep: bool = False, matmul_rate: float | None = None) -> dict:
    """Time the paged prefill kernel on one prompt; returns a dict of the measurements."""
    import torch.nn.functional as F

    from prism.kernels.prefill_attention import (
        PrefillConfig, build_tiles, default_config, paged_prefill_attention, run_prefill,
    )

    dev = torch.device(device)
    q, k, v, k_cache, v_cache, meta = paged_prefill_inputs(
        tokens, heads, kv_heads, head_dim, block_size, page_size, dtype, dev)
    scale = head_dim ** -0.5
    flops = 4 * heads * head_dim * tokens * (tokens + 1) / 2
    group = heads // kv_heads

    # SDPA on contiguous [1, heads, n, d] with K/V expanded to all heads (its flash path)
    qs = q.transpose(0, 1).unsqueeze(0).contiguous()
    ks = k.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    vs = v.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)  # noqa: E731
    expected = sdpa().squeeze(0).transpose(0, 1).float()

    out = paged_prefill_attention(q, k_cache, v_cache, meta, scale)
    torch.cuda.synchronize(dev)
    max_err = (out.float() - expected).abs().max().item()
    kernel_ms = _bench_ms(lambda: paged_prefill_attention(q, k_cache, v_cache, meta, scale))
    sdpa_ms = _bench_ms(sdpa)
    t0 = time.perf_counter()
    for _ in range(100):
        build_tiles(meta.query_lens_host, meta.context_lens_host, default_config(head_dim, dtype, group).block_m // group)
    tiles_us = (time.perf_counter() - t0) / 100 * 1e6
    if matmul_rate is None:
        matmul_rate = matmul_tflops(dev)

    def tflops(ms):
        return flops / (ms * 1e-3) / 1e12

    result = dict(
        case="prefill", device=torch.cuda.get_device_name(dev), tokens=tokens, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, block_size=block_size, blocks_per_page=meta.blocks_per_page, dtype=str(dtype),
        config=default_config(head_dim, dtype, group).__dict__, max_abs_err_vs_sdpa=max_err,
        kernel_ms=kernel_ms, kernel_tflops=tflops(kernel_ms), sdpa_ms=sdpa_ms, sdpa_tflops=tflops(sdpa_ms),
        matmul_tflops=matmul_rate, kernel_fraction_of_matmul=tflops(kernel_ms) / matmul_rate,
        host_tile_table_us=tiles_us,
    )
    if sweep:
        rows = []
        for bm in (64, 128):
            for bn in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        cfg = PrefillConfig(bm, bn, warps, stages)
                        try:
                            o = run_prefill(q, k_cache, v_cache, meta, scale, cfg)
                            err = (o.float() - expected).abs().max().item()
                            ms = _bench_ms(lambda: run_prefill(q, k_cache, v_cache, meta, scale, cfg))  # noqa: B023
                        except Exception as e:  # out of shared memory / registers
                            rows.append(dict(config=cfg.__dict__, error=type(e).__name__))
                            continue
                        rows.append(dict(config=cfg.__dict__, ms=ms, tflops=tflops(ms), max_abs_err=err))
        result["sweep"] = sorted(rows, key=lambda r: r.get("ms", float("inf")))
    return result


def print_prefill(r: dict) -> None:
    print(f"{r['device']}: prefill {r['tokens']} tokens, {r['heads']} heads / {r['kv_heads']} kv heads, "
          f"head_dim {r['head_dim']}, {r['dtype']}, block_size {r['block_size']}, config {r['config']}")
    print(f"  prism paged kernel {r['kernel_ms']:8.3f} ms  {r['kernel_tflops']:6.1f} TFLOP/s  "
          f"({r['kernel_fraction_of_matmul']:.0%} of matmul)  max |err| vs SDPA {r['max_abs_err_vs_sdpa']:.2e}")
    print(f"  torch SDPA (dense)  {r['sdpa_ms']:8.3f} ms  {r['sdpa_tflops']:6.1f} TFLOP/s")
    print(f"  dense bf16 matmul 8192^3         {r['matmul_tflops']:6.1f} TFLOP/s")
    print(f"  host tile table build {r['host_tile_table_us']:.1f} us (once per step, shared by all layers)")
    for row in r.get("sweep", []):
        if "ms" in row:
            print(f"    {row['config']}  {row['ms']:8.3f} ms  {row['tflops']:6.1f} TFLOP/s  err {row['max_abs_err']:.1e}")
        else:
            print(f"    {row['config']}  {row['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="case", required=True)
    p = sub.add_parser("prefill", help="one long prompt through the paged prefill kernel")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--page-size", type=int, default=2 << 20, help="bytes per KV page (per layer, K or V)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--sweep", action="store_true", help="also time a grid of tile sizes")
    p.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    result = bench_prefill(args.tokens, args.heads, args.kv_heads, args.head_dim, args.block_size,
                           args.page_size, DTYPES[args.dtype], args.device, sweep=args.sweep)
    print_prefill(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
