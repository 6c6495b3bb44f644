"""Does a GEMM's first use at a row count make the host wait for the device?

With CUDA's lazy module loading (the default since CUDA 12.2) a kernel is loaded into the
context on its first launch, and loading may synchronize the context: the host then waits for
every kernel already queued. cuBLAS picks its kernel by the problem's shape, so a step whose
row count is new to the process can meet a kernel never launched before. This queues ~QUEUE_MS
of work, launches the LM head's GEMM (M x hidden by vocab x hidden, as a step's logits) and
times the host call, for each M twice: the first pass meets each kernel's first use, the
second none. Then the same for staging a step's inputs behind queued work: a pinned host
buffer of a size the caching host allocator has not held yet (cudaHostAlloc) and of one it
holds, and copies from pageable memory of growing sizes (non_blocking).

    python3 benchmarks/first_use_waits.py [--hidden 4096 --vocab 128256] [--rows 1 1100 7]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F


def queue_work(a: torch.Tensor, b: torch.Tensor, count: int) -> None:
    for _ in range(count):
        torch.mm(a, b)


def launch_ms(h: torch.Tensor, w: torch.Tensor, busy: tuple, count: int) -> float:
    torch.cuda.synchronize()
    queue_work(*busy, count)
    t0 = time.perf_counter()
    F.linear(h, w)
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed * 1e3


def staging_ms(busy: tuple, count: int, dev: torch.device) -> dict[str, float]:
    """Host time of each way of staging a step's input behind `count` queued GEMMs."""
    def timed(fn, *args, **kwargs) -> float:
        torch.cuda.synchronize()
        queue_work(*busy, count)
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        elapsed = time.perf_counter() - t0
        torch.cuda.synchronize()
        return elapsed * 1e3

    found = {}
    for kib in (64, 1024, 16384):
        n = kib << 8  # int32 elements
        for when in ("new size", "cached"):
            found[f"pinned alloc {kib} KiB, {when}"] = timed(torch.empty, n, dtype=torch.int32, pin_memory=True)
        host = torch.arange(n, dtype=torch.int32)
        found[f"pageable copy {kib} KiB"] = timed(host.to, dev, non_blocking=True)
        found[f"pinned copy {kib} KiB"] = timed(host.pin_memory().to, dev, non_blocking=True)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rows", type=int, nargs=3, default=[1, 1100, 7], metavar=("FIRST", "LAST", "STEP"))
    ap.add_argument("--queue", type=int, default=200, help="GEMMs of 4096^3 queued before each launch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    w = torch.randn(args.vocab, args.hidden, device=dev, dtype=torch.bfloat16)
    busy = (torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16),) * 2
    queue_work(*busy, 3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    queue_work(*busy, args.queue)
    torch.cuda.synchronize()
    queued_ms = (time.perf_counter() - t0) * 1e3
    rows = list(range(args.rows[0], args.rows[1] + 1, args.rows[2]))
    hs = {m: torch.randn(m, args.hidden, device=dev, dtype=torch.bfloat16) for m in rows}
    passes = [[launch_ms(hs[m], w, busy, args.queue) for m in rows] for _ in range(2)]
    waited = [(m, a, b) for m, a, b in zip(rows, *passes) if a > queued_ms / 4]
    result = dict(card=torch.cuda.get_device_name(dev), date=time.strftime("%Y-%m-%d"),
                  module_loading=os.environ.get("CUDA_MODULE_LOADING", "(default)"), queued_ms=queued_ms,
                  rows=rows, first_pass_ms=passes[0], second_pass_ms=passes[1],
                  waited_first=[m for m, _, _ in waited], waited_second=[m for m, a, b in zip(rows, *passes)
                                                                          if b > queued_ms / 4])
    print(f"{result['card']}, CUDA_MODULE_LOADING={result['module_loading']}: {queued_ms:.0f} ms queued before each launch; "
          f"{len(rows)} row counts {rows[0]}..{rows[-1]}")
    for name in ("first", "second"):
        p = passes[0 if name == "first" else 1]
        print(f"  {name} pass: launches that waited (over a quarter of the queue): {len(result['waited_' + name])}, "
              f"host time per launch median {sorted(p)[len(p) // 2]:.3f} ms, max {max(p):.1f} ms"
              + (f", at M = {result['waited_' + name][:20]}" if result["waited_" + name] else ""))
    result["staging_ms"] = staging_ms(busy, args.queue, dev)
    for name, ms in result["staging_ms"].items():
        print(f"  {name}: {ms:.3f} ms host time")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
