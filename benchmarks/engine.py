"""One model's speed on the GPU, next to ceilings measured in the same run.

- decode: for each batch size, B sequences with `--context` tokens already in the KV cache
  (prefilled for real), then timed decode steps of the whole engine path (batch building,
  forward over paged KV, sampling). Ceiling: bytes of weights plus KV read per step over the
  device copy bandwidth.
- prefill: one `--prefill` token prompt in one step. Ceiling: its matmul FLOPs (weights and
  causal attention) at the dense bf16 matmul rate.
- offline: `--offline N` requests of `--offline-lens IN OUT` tokens submitted at once to
  engine.generate (continuous batching); output tokens per second.

    python3 benchmarks/engine.py --model llama-3.1-8b:random --batches 1 64 256 --context 1024
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
from prism.engine.profiler import prefill_all, timed_decode_steps  # noqa: E402
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


def matmul_rate(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Dense bf16 matrix product rate in FLOP/s (n x n x n, random data)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3)


def prefill_flops(engine: LLMEngine, n: int) -> float:
    """Matmul FLOPs of one n-token prompt: every layer's projections for n tokens, causal
    attention (QK^T and PV over the lower triangle) and the LM head for the sampled row."""
    c = engine.config
    per_token = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size \
        + 3 * c.hidden_size * c.intermediate_size
    attention = 4 * c.num_heads * c.head_dim * n * (n + 1) / 2
    return c.num_layers * (2 * per_token * n + attention) + 2 * c.hidden_size * c.vocab_size


def run_prefill_case(engine: LLMEngine, n: int, rate: float, repeats: int = 5) -> dict:
    seqs = prefill(engine, 1, n)  # also the warm-up
    seq = seqs[0]
    plan = StepPlan((ScheduledChunk(seq, 0, n),))
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.runner.execute(plan)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    engine.blocks.free(seq)
    time_s = statistics.median(times)
    ceiling_s = prefill_flops(engine, n) / rate
    return dict(phase="prefill", model=engine.source.name, batch=1, context=n, steps=repeats,
                time_ms=time_s * 1e3, roofline_ms=ceiling_s * 1e3, roofline_ratio=time_s / ceiling_s,
                tflops=prefill_flops(engine, n) / time_s / 1e12, fraction_of_matmul_rate=ceiling_s / time_s,
                tokens_per_s=n / time_s)


def run_offline_case(engine: LLMEngine, num_requests: int, input_len: int, output_len: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, engine.config.vocab_size, (input_len,), generator=gen).tolist()
               for _ in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    engine.generate(prompts[: min(8, num_requests)], params)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.token_ids) for o in outs)
    return dict(phase="offline", model=engine.source.name, batch=engine.scheduler.config.max_num_seqs,
                context=input_len + output_len, requests=num_requests, input_len=input_len,
                output_len=output_len, time_ms=elapsed * 1e3, output_tokens=out_tokens,
                output_tokens_per_s=out_tokens / elapsed, total_tokens_per_s=(out_tokens + num_requests * input_len) / elapsed)


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
    for s in seqs:
        assert engine.blocks.allocate(s, s.num_tokens + warmup + steps)
    return timed_decode_steps(engine, seqs, warmup + steps)[warmup:]


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
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--memory-gib", type=float, default=70.0)
    ap.add_argument("--prefill", type=int, nargs="*", default=[4096], help="prompt lengths to time")
    ap.add_argument("--offline", type=int, default=0, help="requests for the offline throughput case")
    ap.add_argument("--offline-lens", type=int, nargs=2, default=[256, 256], metavar=("IN", "OUT"))
    ap.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"])
    ap.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print where one decode step's time goes")
    args = ap.parse_args()
    device = torch.device("cuda:0")
    card = torch.cuda.get_device_name(device)
    bandwidth = copy_bandwidth(device)
    rate = matmul_rate(device)
    max_seqs = max(args.batches + [256 if args.offline else 1])
    t0 = time.perf_counter()
    engine = LLMEngine(
        args.model, EngineConfig(block_size=16, max_num_seqs=max_seqs,
                                 max_num_batched_tokens=max(8192, *args.prefill), kernels=args.kernels,
                                 cuda_graph_max_batch=0 if args.no_graphs else 256),
        DeviceConfig("cuda:0", int(args.memory_gib * 2**30)), show_progress=True,
    )
    print(f"engine ready in {time.perf_counter() - t0:.1f} s (kernels {engine.runner.model.ops.name}, "
          f"graphs {'off' if engine.runner.graphs is None else engine.runner.graphs.buckets})", flush=True)
    cases = [run_case(engine, b, args.context, args.steps, bandwidth) for b in args.batches]
    cases += [run_prefill_case(engine, n, rate) for n in args.prefill]
    if args.offline:
        cases.append(run_offline_case(engine, args.offline, *args.offline_lens))
    if args.profile:
        profile_step(engine, args.batches[0], args.context)
    engine_kernels = engine.runner.model.ops.name + ("" if engine.runner.graphs is None else "+graphs")
    engine.close()
    result = dict(
        benchmark="engine_decode", card=card, date=datetime.date.today().isoformat(),
        command="python3 " + " ".join(sys.argv), torch=torch.__version__,
        ceilings={"copy_bandwidth_GBps": bandwidth / 1e9, "bf16_matmul_TFLOPs": rate / 1e12},
        kernels=engine_kernels, cases=cases,
    )
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    out = Path(args.out or f"benchmarks/results/engine-{slug}-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{card}  copy bandwidth {bandwidth / 1e9:.0f} GB/s (read+write), "
          f"bf16 matmul {rate / 1e12:.0f} TFLOP/s, kernels {engine_kernels}")
    print(f"{'phase':>8} {'batch':>5} {'context':>7} {'ms':>9} {'ceiling ms':>10} {'ratio':>6} {'tok/s':>8}")
    for c in cases:
        if c["phase"] == "offline":
            print(f"{'offline':>8} {c['requests']:>5} {c['input_len']:>3}+{c['output_len']:<3} "
                  f"{c['time_ms']:>9.0f} {'':>10} {'':>6} {c['output_tokens_per_s']:>8.0f} output tok/s")
            continue
        print(f"{c['phase']:>8} {c['batch']:>5} {c['context']:>7} {c['time_ms']:>9.2f} {c['roofline_ms']:>10.2f} "
              f"{c['roofline_ratio']:>6.2f} {c['tokens_per_s']:>8.0f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
