"""Decode step time of one model on the GPU, next to its memory roofline.

For each batch size: B sequences with `--context` tokens already in the KV cache (prefilled
for real), then timed decode steps of the whole engine path (batch building, forward over
paged KV with the reference attention, sampling). Roofline: bytes of weights plus KV read
per step over the device copy bandwidth measured in the same run.

    python3 benchmarks/engine.py --model llama-3.1-8b:random --batches 1 16 64 --context 1024
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism.config import DeviceConfig, EngineConfig  # noqa: E402
from prism.engine.llm_engine import LLMEngine  # noqa: E402
from prism.engine.profiler import prefill_all  # noqa: E402
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan  # noqa: E402
from prism.types import SamplingParams  # noqa: E402


def copy_bandwidth(device: torch.device, num_bytes: int = 2 << 30, repeats: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * num_bytes / statistics.median(times)


def prefill(engine: LLMEngine, batch: int, context: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(batch):
        ids = torch.randint(0, engine.config.vocab_size, (context,), generator=gen).tolist()
        seq = Sequence(f"b{i}", ids, SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True))
        assert engine.blocks.allocate(seq, context), "not enough KV memory for the benchmark"
        seqs.append(seq)
    prefill_all(engine, seqs, context)  # as many per step as the token budget allows
    return seqs


def time_decode(engine: LLMEngine, seqs: list[Sequence], steps: int, warmup: int = 3) -> list[float]:
    times = []
    for step in range(warmup + steps):
        for s in seqs:
            assert engine.blocks.allocate(s, s.num_tokens)
        plan = StepPlan(tuple(ScheduledChunk(s, s.num_computed_tokens, 1) for s in seqs))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampled = engine.runner.execute(plan)  # .tolist() inside synchronizes
        t1 = time.perf_counter()
        engine.scheduler.commit(plan)
        for s, tok in sampled:
            s.output_token_ids.append(tok)
        if step >= warmup:
            times.append(t1 - t0)
    return times


def run_case(engine, batch, context, steps, bandwidth) -> dict:
    seqs = prefill(engine, batch, context)
    times = time_decode(engine, seqs, steps)
    for s in seqs:
        engine.blocks.free(s)
    kv_bytes = batch * (context + 1) * engine.config.kv_bytes_per_token(engine.dtype.itemsize)
    roofline_s = (engine.weights.num_bytes + kv_bytes) / bandwidth
    time_s = statistics.median(times)
    return dict(
        phase="decode", model=engine.source.name, batch=batch, context=context,
        dtype=str(engine.dtype).removeprefix("torch."), steps=len(times),
        time_ms=time_s * 1e3, p90_ms=sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
        weight_bytes=engine.weights.num_bytes, kv_bytes=kv_bytes,
        roofline_ms=roofline_s * 1e3, roofline_ratio=time_s / roofline_s,
        tokens_per_s=batch / time_s,
    )


def profile_step(engine: LLMEngine, batch: int, context: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    seqs = prefill(engine, batch, context)
    time_decode(engine, seqs, steps=1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_decode(engine, seqs, steps=2, warmup=0)
    for s in seqs:
        engine.blocks.free(s)
    for key in ("self_cuda_time_total", "cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=50))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b:random")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--memory-gib", type=float, default=60.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print where one decode step's time goes")
    args = ap.parse_args()
    device = torch.device("cuda:0")
    card = torch.cuda.get_device_name(device)
    bandwidth = copy_bandwidth(device)
    engine = LLMEngine(
        args.model, EngineConfig(block_size=16, max_num_batched_tokens=8192),
        DeviceConfig("cuda:0", int(args.memory_gib * 2**30)), show_progress=True,
    )
    cases = [run_case(engine, b, args.context, args.steps, bandwidth) for b in args.batches]
    if args.profile:
        profile_step(engine, args.batches[0], args.context)
    engine.close()
    result = dict(
        benchmark="engine_decode", card=card, date=datetime.date.today().isoformat(),
        command="python3 " + " ".join(sys.argv), torch=torch.__version__,
        ceilings={"copy_bandwidth_GBps": bandwidth / 1e9}, cases=cases,
    )
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    out = Path(args.out or f"benchmarks/results/engine-{slug}-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{card}  copy bandwidth {bandwidth / 1e9:.0f} GB/s (read+write)")
    print(f"{'batch':>5} {'context':>7} {'step ms':>8} {'roofline ms':>11} {'ratio':>6} {'tok/s':>8}")
    for c in cases:
        print(f"{c['batch']:>5} {c['context']:>7} {c['time_ms']:>8.2f} {c['roofline_ms']:>11.2f} "
              f"{c['roofline_ratio']:>6.2f} {c['tokens_per_s']:>8.0f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
