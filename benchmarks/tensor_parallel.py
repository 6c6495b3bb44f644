"""Tensor-parallel speed on the GPUs of one host: decode, prefill and activating all shards.

For each TP size this script spawns one process per GPU (no torchrun; NCCL with NVLink
multicast off in every process), each building the engine of its shard (prism.engine.parallel),
and measures, next to ceilings measured on the same GPUs in the same run:

- decode: for each batch size, B sequences with `--context` tokens in KV (prefilled for real),
  then timed decode steps of the whole batch. Ceiling: the bytes one GPU reads per step (its
  shard's weights, without the replicated embedding of which a step reads a few rows, plus its
  KV) over its device copy bandwidth. Also reported: the time of the step's 2 x layers
  all-reduces of [B, hidden] alone.
- prefill: one `--prefill` token prompt in one step. Ceiling: one GPU's matmul FLOPs at the
  dense bf16 rate measured on it.
- activation: every rank evicts, then all activate at once, each GPU copying its shard from
  its pinned host copy. Ceiling: all shards' bytes / (one GPU's host-to-device bandwidth x the
  number of GPUs); the bandwidth is measured on one GPU alone and on all at once (the host's
  memory or PCIe switches may not give every GPU its full rate together).

    python3 benchmarks/tensor_parallel.py --model llama-3.1-70b:random --tp 4 8
    python3 benchmarks/tensor_parallel.py --model qwen2.5-32b:random --tp 1 2 4
    python3 benchmarks/tensor_parallel.py --model tiny-llama:random --tp 2 --device cpu \
        --backend gloo --batches 1 4 --context 64 --prefill 128 --memory-gib 0.5   # CPU smoke

A TP size whose KV does not fit a batch reports that case as skipped. `--tp 1` runs the plain
single-GPU engine (no process group), the baseline.
"""
from __future__ import annotations

import os

# NVLink multicast must stay off on the lent machines (it can take the host's GPUs out of
# service): set before torch or NCCL start, here and again in every spawned rank.
os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                   "NVSHMEM_DISABLE_NVLS": "1"})

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism.config import DeviceConfig, EngineConfig  # noqa: E402
from prism.engine.catalog import resolve_model  # noqa: E402
from prism.engine.llm_engine import LLMEngine  # noqa: E402
from prism.engine.parallel import (  # noqa: E402
    TPGroup, destroy_tp_group, disable_multicast, free_port, init_tp_group,
)
from prism.engine.profiler import prefill_all, timed_decode_steps  # noqa: E402
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan  # noqa: E402
from prism.engine.tp_shard import TPError, check_tp  # noqa: E402
from prism.types import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)


# ---- timing and ceilings on one device ------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, num_bytes: int) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats=10)
    return 2 * num_bytes / seconds


def matmul_rate(device: torch.device, n: int) -> float:
    """Dense matrix product rate in FLOP/s (bf16 on CUDA, float32 on a CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats=5)


def h2d_bandwidth(device: torch.device, num_bytes: int) -> float:
    """Host (pinned on CUDA) to device copy rate in bytes/s."""
    src = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    return num_bytes / timed(lambda: dst.copy_(src, non_blocking=True), device, repeats=5)


def allreduce_seconds(tp: TPGroup | None, device, dtype, batch: int, hidden: int, num: int) -> float:
    """Seconds of `num` all-reduces of [batch, hidden]: what one decode step spends in them."""
    if tp is None:
        return 0.0
    x = torch.ones(batch, hidden, dtype=dtype, device=device)

    def run():
        for _ in range(num):
            tp.all_reduce(x)
    return timed(run, device, repeats=5)


# ---- the cases --------------------------------------------------------------------------------
def step_weight_bytes(engine: LLMEngine) -> int:
    """Weight bytes one decode step reads on this GPU: all but the embedding (a few rows are
    read), plus the LM head's rows when it is tied to the embedding."""
    itemsize = engine.dtype.itemsize
    embed = engine.weights.tensors["embed"]
    head = engine.runner.model.lm_head
    read = engine.weights.num_bytes - embed.numel() * itemsize
    return read + (head.numel() * itemsize if engine.config.tie_word_embeddings else 0)


def new_seqs(engine: LLMEngine, batch: int, context: int, tag: str) -> list[Sequence]:
    gen = torch.Generator().manual_seed(0)  # the same prompts on every rank
    return [Sequence(f"{tag}{i}", torch.randint(0, engine.config.vocab_size, (context,),
                                                generator=gen).tolist(), GREEDY)
            for i in range(batch)]


def fits(engine: LLMEngine, batch: int, tokens: int) -> bool:
    # num_available_blocks is agreed on by all ranks (the smallest room among their GPUs).
    return batch * engine.blocks.num_blocks_for(tokens) <= engine.blocks.num_available_blocks()


def decode_case(engine, tp, batch, context, steps, bandwidth) -> dict:
    case = dict(phase="decode", batch=batch, context=context)
    if not fits(engine, batch, context + steps + 3):
        return dict(case, skipped="KV does not fit")
    seqs = new_seqs(engine, batch, context, "d")
    for s in seqs:
        assert engine.blocks.allocate(s, context + steps + 3)
    prefill_all(engine, seqs, context)
    times = timed_decode_steps(engine, seqs, 3 + steps)[3:]
    for s in seqs:
        engine.blocks.free(s)
    c = engine.config
    kv_bytes = batch * (context + 1) * c.kv_bytes_per_token(engine.dtype.itemsize)
    read = step_weight_bytes(engine) + kv_bytes
    time_s = statistics.median(times)
    collectives = allreduce_seconds(tp, engine.device, engine.dtype, batch, c.hidden_size, 2 * c.num_layers)
    return dict(case, steps=len(times), time_ms=time_s * 1e3, weight_bytes=engine.weights.num_bytes,
                weight_bytes_read=read - kv_bytes, kv_bytes=kv_bytes, roofline_ms=read / bandwidth * 1e3,
                roofline_ratio=time_s / (read / bandwidth), allreduce_ms=collectives * 1e3,
                tokens_per_s=batch / time_s)


def prefill_flops(engine: LLMEngine, n: int) -> float:
    """Matmul FLOPs of one n-token prompt on this GPU (its heads, MLP slice and LM head rows)."""
    c = engine.config
    per_token = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size \
        + 3 * c.hidden_size * c.intermediate_size
    attention = 4 * c.num_heads * c.head_dim * n * (n + 1) / 2
    return c.num_layers * (2 * per_token * n + attention) + 2 * engine.runner.model.lm_head.numel()


def prefill_case(engine, n, rate, repeats) -> dict:
    case = dict(phase="prefill", batch=1, context=n)
    if not fits(engine, 1, n):
        return dict(case, skipped="KV does not fit")
    seq = new_seqs(engine, 1, n, "p")[0]
    assert engine.blocks.allocate(seq, n)
    plan = StepPlan((ScheduledChunk(seq, 0, n),))  # the same KV slots are rewritten each run
    time_s = timed(lambda: engine.runner.execute(plan), engine.device, repeats, warmup=1)
    engine.blocks.free(seq)
    ceiling = prefill_flops(engine, n) / rate
    return dict(case, steps=repeats, time_ms=time_s * 1e3, roofline_ms=ceiling * 1e3,
                roofline_ratio=time_s / ceiling, tokens_per_s=n / time_s)


def activation_case(engine, tp, repeats) -> dict:
    """Evict every shard, then activate all at once: each GPU copies its shard in parallel."""
    times = []
    for _ in range(repeats):
        engine.evict()
        _barrier(tp)
        sync(engine.device)
        t0 = time.perf_counter()
        engine.activate()  # maps (agreed by all ranks) and copies; synchronizes on CUDA
        sync(engine.device)
        own = time.perf_counter() - t0
        _barrier(tp)
        times.append((time.perf_counter() - t0, own))
    return dict(phase="activation", shard_bytes=engine.weights.num_bytes,
                time_ms=statistics.median(t for t, _ in times) * 1e3,
                own_copy_ms=statistics.median(o for _, o in times) * 1e3)


def _barrier(tp: TPGroup | None) -> None:
    if tp is not None:
        tp.barrier()


# ---- one rank -------------------------------------------------------------------------------
def rank_main(rank: int, size: int, port: int, args: dict, results) -> None:
    disable_multicast()  # again, in this process, before NCCL starts
    try:
        results.put((rank, run_rank(rank, size, port, args)))
    except BaseException:
        results.put((rank, {"error": traceback.format_exc()}))
    finally:
        destroy_tp_group()


def run_rank(rank: int, size: int, port: int, a: dict) -> dict:
    cuda = a["device"] == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    tp = init_tp_group(rank, size, port, a["backend"], device, a["timeout_s"]) if size > 1 else None
    big = 1 << 30 if cuda else 64 << 20
    out: dict = {"rank": rank, "device": str(device)}
    out["copy_bandwidth"] = bandwidth = copy_bandwidth(device, 2 * big if cuda else big)
    out["matmul_rate"] = rate = matmul_rate(device, 8192 if cuda else 1024)
    _barrier(tp)
    if rank == 0:  # alone first, then every GPU at once
        out["h2d_alone"] = h2d_bandwidth(device, big)
    _barrier(tp)
    out["h2d_together"] = h2d_bandwidth(device, big)
    _barrier(tp)

    t0 = time.perf_counter()
    engine = LLMEngine(
        a["model"],
        EngineConfig(block_size=16, max_num_seqs=max(a["batches"]),
                     max_num_batched_tokens=max(8192, *a["prefill"]), kernels=a["kernels"],
                     cuda_graph_max_batch=a["cuda_graph_max_batch"]),
        DeviceConfig(str(device), int(a["memory_gib"] * 2**30), page_size=a["page_size"]),
        keep_host_copy=True, tp=tp, show_progress=rank == 0,
    )
    out["engine_ready_s"] = time.perf_counter() - t0
    out["kernels"] = engine.runner.model.ops.name + ("" if engine.runner.graphs is None else "+graphs")
    out["shard_weight_bytes"] = engine.weights.num_bytes
    try:
        cases = [decode_case(engine, tp, b, a["context"], a["steps"], bandwidth) for b in a["batches"]]
        cases += [prefill_case(engine, n, rate, a["repeats"]) for n in a["prefill"]]
        cases.append(activation_case(engine, tp, a["repeats"]))
    finally:
        engine.close()
    out["cases"] = cases
    return out


# ---- one TP size ----------------------------------------------------------------------------
def run_tp(size: int, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    settings = vars(args) | {"timeout_s": args.timeout_s}
    procs = [ctx.Process(target=rank_main, args=(r, size, port, settings, results)) for r in range(size)]
    for p in procs:
        p.start()
    ranks: dict[int, dict] = {}
    deadline = time.monotonic() + args.timeout_s
    try:
        while len(ranks) < size:
            try:
                rank, res = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"TP {size}: ranks {sorted(set(range(size)) - set(ranks))} "
                                   f"gave no result within {args.timeout_s} s") from None
            ranks[rank] = res
            if "error" in res:
                raise RuntimeError(f"TP {size} rank {rank} failed:\n{res['error']}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return summarize(size, [ranks[r] for r in range(size)])


def summarize(size: int, ranks: list[dict]) -> dict:
    """Rank 0's cases, each time the slowest rank's; activation against its ceiling."""
    cases = []
    for i, case in enumerate(ranks[0]["cases"]):
        case = dict(case)
        if "time_ms" in case:
            case["time_ms_by_rank"] = [r["cases"][i]["time_ms"] for r in ranks]
            case["time_ms"] = max(case["time_ms_by_rank"])
            if "roofline_ms" in case:
                case["roofline_ratio"] = case["time_ms"] / case["roofline_ms"]
        if case["phase"] == "activation":
            total = sum(r["shard_weight_bytes"] for r in ranks)
            alone = ranks[0]["h2d_alone"]
            together = sum(r["h2d_together"] for r in ranks)
            case.update(total_bytes=total, roofline_ms=total / (alone * size) * 1e3,
                        roofline_together_ms=total / together * 1e3)
            case["roofline_ratio"] = case["time_ms"] / case["roofline_ms"]
        cases.append(case)
    first = ranks[0]
    return dict(tp=size, kernels=first["kernels"], engine_ready_s=max(r["engine_ready_s"] for r in ranks),
                shard_weight_bytes=first["shard_weight_bytes"],
                copy_bandwidth_GBps=[r["copy_bandwidth"] / 1e9 for r in ranks],
                matmul_TFLOPs=[r["matmul_rate"] / 1e12 for r in ranks],
                h2d_alone_GBps=first["h2d_alone"] / 1e9,
                h2d_together_GBps=[r["h2d_together"] / 1e9 for r in ranks], cases=cases)


def print_tp(res: dict) -> None:
    print(f"\nTP {res['tp']}: shard {res['shard_weight_bytes'] / 2**30:.2f} GiB, kernels {res['kernels']}, "
          f"copy {min(res['copy_bandwidth_GBps']):.0f} GB/s, h2d {res['h2d_alone_GBps']:.1f} GB/s alone / "
          f"{min(res['h2d_together_GBps']):.1f} GB/s each together")
    print(f"{'phase':>10} {'batch':>5} {'context':>7} {'ms':>9} {'ceiling':>9} {'ratio':>6} {'allreduce':>9}")
    for c in res["cases"]:
        if "skipped" in c:
            print(f"{c['phase']:>10} {c['batch']:>5} {c['context']:>7}  skipped: {c['skipped']}")
            continue
        print(f"{c['phase']:>10} {c.get('batch', ''):>5} {c.get('context', ''):>7} {c['time_ms']:>9.2f} "
              f"{c['roofline_ms']:>9.2f} {c['roofline_ratio']:>6.2f} {c.get('allreduce_ms', 0):>9.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-70b:random")
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8], help="group sizes to run")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--backend", default=None, choices=["nccl", "gloo"], help="default: nccl on cuda")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps")
    ap.add_argument("--prefill", type=int, nargs="*", default=[4096], help="prompt lengths to time")
    ap.add_argument("--repeats", type=int, default=3, help="timed prefills and activations")
    ap.add_argument("--memory-gib", type=float, default=70.0, help="page budget of each GPU")
    ap.add_argument("--page-size", type=int, default=2 << 20)
    ap.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"])
    ap.add_argument("--cuda-graph-max-batch", type=int, default=256,
                    help="0: decode without CUDA graphs (NCCL all-reduces are captured otherwise)")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per TP size")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    config = resolve_model(args.model).config
    if args.device == "cuda":
        card = torch.cuda.get_device_name(0)
        available = torch.cuda.device_count()
    else:
        card, available = "cpu", os.cpu_count() or 1
    results, skipped = [], {}
    for size in args.tp:
        try:
            check_tp(config, size, args.model)
        except TPError as e:
            skipped[size] = str(e)
            continue
        if args.device == "cuda" and size > available:
            skipped[size] = f"needs {size} GPUs, this host has {available}"
            continue
        res = run_tp(size, args)
        print_tp(res)
        results.append(res)
    for size, why in skipped.items():
        print(f"TP {size} skipped: {why}")
    result = dict(benchmark="tensor_parallel", model=args.model, card=card, gpus=available,
                  date=datetime.date.today().isoformat(), command="python3 " + " ".join(sys.argv),
                  torch=torch.__version__, backend=args.backend, results=results,
                  skipped={str(k): v for k, v in skipped.items()})
    slug = re.sub(r"[^a-z0-9]+", "-", f"{card}-{args.model}".lower()).strip("-")
    out = Path(args.out or f"benchmarks/results/tensor-parallel-{slug}-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
