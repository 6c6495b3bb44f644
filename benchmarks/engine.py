"""One model's speed on the GPU, next to ceilings measured in the same run.

- decode: for each batch size, B sequences with `--context` tokens already in the KV cache
  (prefilled for real), then timed decode steps of the whole engine path (batch building,
  forward over paged KV, sampling). Ceiling: bytes of weights plus KV read per step over the
  device copy bandwidth; and, as a roofline for large batches, per operation (`decode_ceilings`).
- prefill: one `--prefill` token prompt in one step. Ceiling: its matmul FLOPs (weights and
  causal attention) at the dense bf16 matmul rate.
- offline: `--offline N` requests of `--offline-lens IN OUT` tokens (and with `--offline-azure`
  the Azure conv trace's lengths) submitted at once to engine.generate (continuous batching);
  output tokens per second, and where the wall time went (offline_case.py).
- `--decode-sweep`, `--activation`, `--elastic`, `--two-streams`: see engine_cases.py.

    python3 benchmarks/engine.py --model llama-3.1-8b:random --batches 1 64 256 --context 1024
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
from dataclasses import asdict
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_cases as cases_mod  # noqa: E402
import offline_case  # noqa: E402

from prism.config import DeviceConfig, EngineConfig  # noqa: E402
from prism.engine.llm_engine import LLMEngine  # noqa: E402
from prism.engine.profiler import measure_h2d_bandwidth, timed_decode_steps  # noqa: E402
from prism.kernels import decode_attention  # noqa: E402
from prism.worker.process import freeze_startup_heap  # noqa: E402
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan  # noqa: E402


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


def layer_params(c) -> int:
    """Weights one token multiplies in one layer (q, k, v, o, gate, up, down projections)."""
    return c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size


def prefill_flops(engine: LLMEngine, n: int) -> float:
    """Matmul FLOPs of one n-token prompt: every layer's projections for n tokens, causal
    attention (QK^T and PV over the lower triangle) and the LM head for the sampled row."""
    c = engine.config
    attention = 4 * c.num_heads * c.head_dim * n * (n + 1) / 2
    return c.num_layers * (2 * layer_params(c) * n + attention) + 2 * c.hidden_size * c.vocab_size


def decode_ceilings(c, weight_bytes: float, kv_bytes: float, batch: int, bandwidth: float, rate: float) -> tuple[float, float]:
    """Two floors of one decode step, in seconds: every byte (weights and KV) at the copy
    bandwidth; and per operation, attention reading its KV at the bandwidth plus the GEMMs
    at the slower of their weights' bytes and their FLOPs (projections and LM head for every
    sequence) at the matmul rate. They agree while the GEMMs are bound by bytes; at large
    batches the GEMMs are bound by FLOPs and only the second is a roofline."""
    gemm_flops = 2 * batch * (c.num_layers * layer_params(c) + c.hidden_size * c.vocab_size)
    by_bytes = (weight_bytes + kv_bytes) / bandwidth
    return by_bytes, kv_bytes / bandwidth + max(weight_bytes / bandwidth, gemm_flops / rate)


def run_prefill_case(engine: LLMEngine, n: int, rate: float, repeats: int = 5) -> dict:
    seqs = cases_mod.prefilled(engine, 1, n)  # also the warm-up
    seq = seqs[0]
    plan = StepPlan((ScheduledChunk(seq, 0, n),))
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.runner.execute(plan)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    cases_mod.free(engine, seqs)
    time_s = statistics.median(times)
    ceiling_s = prefill_flops(engine, n) / rate
    return dict(phase="prefill", model=engine.source.name, batch=1, context=n, steps=repeats,
                time_ms=time_s * 1e3, roofline_ms=ceiling_s * 1e3, roofline_ratio=time_s / ceiling_s,
                tflops=prefill_flops(engine, n) / time_s / 1e12, fraction_of_matmul_rate=ceiling_s / time_s,
                tokens_per_s=n / time_s)


def time_decode(engine: LLMEngine, seqs: list[Sequence], steps: int, warmup: int = 3) -> list[float]:
    for s in seqs:
        assert engine.blocks.allocate(s, s.num_tokens + warmup + steps)
    return timed_decode_steps(engine, seqs, warmup + steps)[warmup:]


def run_case(engine, batch, context, steps, bandwidth, rate) -> dict:
    seqs = cases_mod.prefilled(engine, batch, context)
    times = time_decode(engine, seqs, steps)
    cases_mod.free(engine, seqs)
    kv_bytes = batch * (context + 1) * engine.config.kv_bytes_per_token(engine.dtype.itemsize)
    roofline_s, per_op_s = decode_ceilings(engine.config, engine.weights.num_bytes, kv_bytes, batch, bandwidth, rate)
    time_s = statistics.median(times)
    return dict(
        phase="decode", model=engine.source.name, batch=batch, context=context,
        dtype=str(engine.dtype).removeprefix("torch."), steps=len(times),
        time_ms=time_s * 1e3, p90_ms=sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
        weight_bytes=engine.weights.num_bytes, kv_bytes=kv_bytes,
        roofline_ms=roofline_s * 1e3, roofline_ratio=time_s / roofline_s,
        per_op_roofline_ms=per_op_s * 1e3, per_op_ratio=time_s / per_op_s,
        tokens_per_s=batch / time_s,
    )


def profile_step(engine: LLMEngine, batch: int, context: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    seqs = cases_mod.prefilled(engine, batch, context)
    time_decode(engine, seqs, steps=1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_decode(engine, seqs, steps=2, warmup=0)
    cases_mod.free(engine, seqs)
    for key in ("self_cuda_time_total", "cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=50))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b:random")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--memory-gib", type=float, default=70.0)
    ap.add_argument("--prefill", type=int, nargs="*", default=[4096], help="prompt lengths to time")
    ap.add_argument("--offline", type=int, default=0, help="requests for the offline throughput case")
    ap.add_argument("--offline-lens", type=int, nargs=2, default=[256, 256], metavar=("IN", "OUT"))
    ap.add_argument("--offline-azure", default=None, metavar="JSON",
                    help="also run offline with these (input, output) lengths (benchmarks/traces/azure-conv-lengths-1000.json)")
    ap.add_argument("--host-profile", type=int, default=0, metavar="N",
                    help="offline: also the host's N slowest functions (own wall time, cProfile) in a run with overlap")
    ap.add_argument("--api-profile", type=int, nargs=2, default=None, metavar=("FIRST", "LAST"),
                    help="offline: also the host calls (CUDA runtime, torch ops) of launches FIRST..LAST "
                         "by host time (torch.profiler), overlap on")
    ap.add_argument("--no-gc-freeze", action="store_true",
                    help="leave the startup heap in Python's full garbage collections (the server's workers freeze it)")
    ap.add_argument("--max-seqs", type=int, default=256, help="engine's max_num_seqs (and CUDA graph batch) for offline")
    ap.add_argument("--decode-sweep", action="store_true",
                    help="first time the decode kernel's tile configurations at the largest batch; use the fastest")
    ap.add_argument("--activation", action="store_true", help="time evict + activate against host-to-device bandwidth")
    ap.add_argument("--elastic", action="store_true", help="TTFT/TPOT with KV pages on demand vs all mapped up front")
    ap.add_argument("--two-streams", type=int, nargs="*", default=[], metavar="BATCH",
                    help="decode of this model and a second copy on two streams vs alternated, at these batches")
    ap.add_argument("--mixed", nargs="*", default=[], metavar="PREFILL:DECODES",
                    help="time one step of a PREFILL-token prompt beside DECODES decodes (at --context): "
                         "piecewise graphs vs eager, e.g. 32:0 64:32")
    ap.add_argument("--many-models", type=int, default=0, metavar="N",
                    help="N copies of the model on one device, each decoding --many-batch requests: stepped in turn, "
                         "waited for / overlapped / on a stream each")
    ap.add_argument("--many-batch", type=int, default=8)
    ap.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"])
    ap.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    ap.add_argument("--graph-tokens", type=int, default=EngineConfig().mixed_graph_max_tokens,
                    help="steps with prefill up to this many tokens run as piecewise CUDA graphs")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print where one decode step's time goes")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    device = torch.device("cuda:0")
    card = torch.cuda.get_device_name(device)
    ceilings = {"copy_bandwidth_GBps": copy_bandwidth(device) / 1e9, "bf16_matmul_TFLOPs": matmul_rate(device) / 1e12,
                "h2d_pinned_GBps": measure_h2d_bandwidth(device, num_bytes=1 << 30) / 1e9}
    max_seqs = max(args.batches + [args.max_seqs if args.offline or args.offline_azure else 1])
    t0 = time.perf_counter()
    engine = build_engine(args.model, args, max_seqs)
    if not args.no_gc_freeze:
        freeze_startup_heap()  # as the server's device workers do once started
    print(f"engine ready in {time.perf_counter() - t0:.1f} s (kernels {engine.runner.model.ops.name}, "
          f"graphs {'off' if engine.runner.graphs is None else engine.runner.graphs.buckets})", flush=True)
    cases, extra, errors = run_cases(engine, args, ceilings)
    engine_kernels = engine.runner.model.ops.name + ("" if engine.runner.graphs is None else "+graphs")
    engine.close()
    result = dict(
        benchmark="engine_decode", card=card, date=datetime.date.today().isoformat(),
        command="python3 " + " ".join(sys.argv), torch=torch.__version__, ceilings=ceilings,
        kernels=engine_kernels, decode_config=asdict(decode_attention.DEFAULT_CONFIG), cases=cases,
        errors=errors, **extra,
    )
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    out = Path(args.out or f"benchmarks/results/engine-{slug}-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(result)
    for line in errors:
        print(f"FAILED {line}")
    print(f"wrote {out}")
    return 0


def run_cases(engine: LLMEngine, args, ceilings: dict) -> tuple[list[dict], dict, list[str]]:
    """(cases, extra JSON entries, errors). The step and prefill cases always run; an
    optional case that fails is reported and the others still run (device time is scarce)."""
    bandwidth, rate = ceilings["copy_bandwidth_GBps"] * 1e9, ceilings["bf16_matmul_TFLOPs"] * 1e12
    cases, extra, errors = [], {}, []

    def attempt(name, fn) -> list[dict]:
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            errors.append(f"{name}: {type(e).__name__}: {e}")
            return []
        return got if isinstance(got, list) else [got]

    if args.decode_sweep:
        for sweep in attempt("decode sweep", lambda: cases_mod.decode_kernel_sweep(
                engine, max(args.batches), args.context, bandwidth)):
            extra["decode_kernel_sweep"] = sweep
            use_fastest_decode_config(engine, sweep)
    cases += [run_case(engine, b, args.context, args.steps, bandwidth, rate) for b in args.batches]
    cases += [run_prefill_case(engine, n, rate) for n in args.prefill]
    for spec in args.mixed:
        prefill, decodes = map(int, spec.split(":"))
        cases += attempt(f"mixed {spec}", lambda p=prefill, d=decodes: cases_mod.mixed_step_case(engine, p, d, args.context))
    if args.elastic:
        cases += attempt("elastic", lambda: cases_mod.elastic_overhead_case(engine))
    if args.activation:
        h2d = ceilings["h2d_pinned_GBps"] * 1e9
        cases += attempt("activation", lambda: cases_mod.activation_case(engine, h2d))
    if args.offline:
        lens = [tuple(args.offline_lens)] * args.offline
        cases += attempt("offline", lambda: offline_case.offline_case(engine, lens, f"{lens[0][0]}+{lens[0][1]}",
                                                                                 args.host_profile, args.api_profile))
    if args.offline_azure:
        pairs = [tuple(p) for p in json.loads(Path(args.offline_azure).read_text())["pairs"]]
        cases += attempt("offline azure", lambda: offline_case.offline_case(engine, pairs, "azure conv"))
    if args.two_streams:
        cases += attempt("two streams", lambda: two_streams_cases(engine, args))
    if args.many_models:
        cases += attempt("many models", lambda: many_models_cases(engine, args))
    if args.profile:
        profile_step(engine, args.batches[0], args.context)
    return cases, extra, errors


def build_engine(model: str, args, max_seqs: int, pool=None, model_id=None, own_stream=False) -> LLMEngine:
    return LLMEngine(
        model, EngineConfig(block_size=16, max_num_seqs=max_seqs,
                            max_num_batched_tokens=max([8192, *args.prefill]), kernels=args.kernels,
                            cuda_graph_max_batch=0 if args.no_graphs else max(256, max_seqs),
                            mixed_graph_max_tokens=0 if args.no_graphs else args.graph_tokens, own_stream=own_stream),
        DeviceConfig("cuda:0", int(args.memory_gib * 2**30)), pool=pool, model_id=model_id,
        show_progress=True, keep_host_copy=args.activation,
    )


def use_fastest_decode_config(engine: LLMEngine, sweep: dict) -> None:
    """Make the sweep's fastest accurate configuration the decode kernel's, and capture the
    engine's graphs again with it."""
    ok = [r for r in sweep["rows"] if "ms" in r and r["max_abs_err"] < 2e-2]
    if not ok:
        return
    decode_attention.DEFAULT_CONFIG = decode_attention.DecodeConfig(**ok[0]["config"])
    if engine.runner.graphs is not None:
        engine.runner.capture_graphs(engine.runner.graphs.max_batch, 0, engine.max_model_len)
    print(f"decode kernel: {decode_attention.DEFAULT_CONFIG} ({ok[0]['ms']:.3f} ms per layer at batch "
          f"{sweep['batch']}, {ok[0]['roofline_ratio']:.2f}x its KV bytes)", flush=True)


def two_streams_cases(engine: LLMEngine, args) -> list[dict]:
    """A second copy of the model (other random weights) on the same pool. Its graphs go to a
    pool of their own (own_stream), so the two models' graphs may run at the same time."""
    second = build_engine(args.model + ":1" if args.model.endswith(":random") else args.model,
                          args, max(args.two_streams), pool=engine.pool, model_id=engine.model_id + "-b",
                          own_stream=True)
    try:
        return [cases_mod.two_streams_case(engine, second, b, args.context) for b in args.two_streams]
    finally:
        second.close()


def many_models_cases(engine: LLMEngine, args) -> list[dict]:
    """`--many-models` copies of the model (other random weights each) on the engine's pool,
    each on a stream of its own; the engine itself is not one of them."""
    base = args.model.removesuffix(":random") if args.model.endswith(":random") else None
    engines = []
    try:
        for i in range(args.many_models):
            name = f"{base}:random:{i + 2}" if base else args.model
            engines.append(build_engine(name, args, args.many_batch, pool=engine.pool,
                                        model_id=f"{engine.model_id}-m{i}", own_stream=True))
        return cases_mod.many_models_case(engines, args.many_batch, args.context)
    finally:
        for e in engines:
            e.close()


def print_table(result: dict) -> None:
    c = result["ceilings"]
    print(f"\n{result['card']}  copy {c['copy_bandwidth_GBps']:.0f} GB/s (read+write), bf16 matmul "
          f"{c['bf16_matmul_TFLOPs']:.0f} TFLOP/s, pinned host-to-device {c['h2d_pinned_GBps']:.1f} GB/s, "
          f"kernels {result['kernels']}, decode {result['decode_config']}")
    for row in result.get("decode_kernel_sweep", {}).get("rows", [])[:6]:
        print(f"  decode kernel {row['config']}: " + (f"{row['ms']:.3f} ms/layer, {row['roofline_ratio']:.2f}x, "
              f"err {row['max_abs_err']:.1e}" if "ms" in row else row["error"]))
    print(f"{'case':>18} {'batch':>5} {'context':>9} {'ms':>9} {'ceiling ms':>10} {'ratio':>6}  rate")
    for c in result["cases"]:
        what, batch, ctx, rate = c["phase"], c.get("batch", ""), c.get("context", ""), ""
        if what == "offline":
            what, batch, ctx = f"offline {c['lengths']}", c["requests"], f"{c['input_len']:.0f}+{c['output_len']:.0f}"
            sec, steps = c["seconds"], c["steps"]
            what += " overlap" if c.get("overlap") else " no overlap"
            idle = c.get("gpu_idle_between_steps_us") or {}
            counts = {k: steps.get(k, steps.get(k.removesuffix(" steps"))) for k in sec}
            rate = (f"{c['output_tokens_per_s']:.0f} output tok/s; of the wall time: "
                    + ", ".join(f"{k} {v:.2f} s" + (f" ({counts[k]}x)" if counts[k] is not None else "")
                                for k, v in sec.items()))
            if c.get("allocator"):
                rate += "; torch allocator: " + ", ".join(f"{k} {v}" for k, v in c["allocator"].items())
            if idle:
                rate += f"; GPU idle between steps {idle['mean']:.0f} us mean, {idle['median']:.0f} median" + "".join(
                    f"; before {k} steps {v['idle_before_ms']:.0f} ms ({v['idle_over_1ms']} over 1 ms), "
                    f"their device time {v['device_ms']:.0f} ms" for k, v in idle.get("by_next_step", {}).items())
        elif what == "elastic_overhead":
            what, batch, ctx = f"elastic {c['load']} {c['metric'][:4]}", "", ""
        elif what == "mixed_step":
            what, batch, rate = f"mixed {c['prefill_tokens']}+{c['batch']}", c["batch"], \
                (f"{'graphs' if c['graphs'] else 'eager (over the graph cap)'} vs eager (ceiling column); "
                 f"launch holds the host {c['launch_ms']:.2f} ms (eager {c['eager_launch_ms']:.2f}); "
                 f"same tokens: {c['same_tokens']}")
        elif what == "many_models":
            what, batch, rate = f"{c['models']} models: {c['mode']}", c["batch"], \
                f"{c['tokens_per_s']:.0f} tok/s, {c['vs_one_model_per_step']:.2f}x one model per step"
        elif what == "activation":
            batch, ctx, rate = "", "", f"{c['GBps']:.1f} GB/s"
        elif "tokens_per_s" in c:
            rate = f"{c['tokens_per_s']:.0f} tok/s" + (f", {c['per_op_ratio']:.2f}x per operation" if "per_op_ratio" in c else "")
        ceiling = f"{c['roofline_ms']:>10.2f} {c['roofline_ratio']:>6.2f}" if "roofline_ms" in c else f"{'':>17}"
        print(f"{what:>18} {batch:>5} {ctx:>9} {c['time_ms']:>9.2f} {ceiling}  {rate}")
        for gap in (c.get("gpu_idle_between_steps_us") or {}).get("longest", [])[:8]:
            print("    idle before step " + ", ".join(f"{k} {v}" for k, v in gap.items() if k != "before_step")
                  + f" (step {gap['before_step']})")


if __name__ == "__main__":
    sys.exit(main())
