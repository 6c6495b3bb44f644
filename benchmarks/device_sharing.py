"""Many models on one GPU: activation cost, and KV growing and shrinking under mixed load.

Part 1: activate llama-3.1-8b:random (16 GB in bf16) from its pinned host copy, next to its
bytes over the host-to-device bandwidth measured in the same run; free device memory (as
CUDA reports it) before eviction, after eviction and after reactivation.
Part 2: four models of 1B to 8B shapes on one device worker; waves of requests hit one
model after another, so each model's KV grows while it is busy and shrinks after. Pages per
model are sampled after every step; step times are reported per model.

    python3 benchmarks/device_sharing.py --out $OUT/device_sharing.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism.config import DeviceConfig, EngineConfig, ModelSpec  # noqa: E402
from prism.engine.llm_engine import LLMEngine  # noqa: E402
from prism.engine.profiler import measure_h2d_bandwidth  # noqa: E402
from prism.types import SamplingParams  # noqa: E402
from prism.worker.device_worker import DeviceWorker, WorkerConfig  # noqa: E402

GIB = 1 << 30


def free_gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / GIB


def activation(model: str, h2d: float, repeats: int = 3) -> dict:
    engine = LLMEngine(model, EngineConfig(), DeviceConfig("cuda:0", 40 * GIB), keep_host_copy=True)
    try:
        probe = engine.weights.tensors["embed"][:4, :8].clone()
        resident = free_gib()
        times = []
        for _ in range(repeats):
            engine.evict()
            evicted = free_gib()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.activate()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        intact = bool(torch.equal(probe, engine.weights.tensors["embed"][:4, :8]))
        nbytes = engine.weights.num_bytes
    finally:
        engine.close()
    bound = nbytes / h2d
    return dict(model=model, weight_bytes=nbytes, activation_s=statistics.median(times),
                activation_all_s=times, h2d_bound_s=bound, ratio=statistics.median(times) / bound,
                free_gib_resident=resident, free_gib_evicted=evicted, free_gib_after_close=free_gib(),
                weights_intact_after_reactivation=intact)


MODELS = ("llama-3.2-1b:random", "llama-3.2-3b:random", "qwen2.5-7b:random", "llama-3.1-8b:random")


def sharing(budget_gib: float, prompt_len: int, out_len: int, per_wave: int) -> dict:
    engine = EngineConfig(block_size=16, max_num_batched_tokens=4096, max_num_seqs=128)
    models = tuple(ModelSpec(f"m{i}-{s.split(':')[0]}", s, ttft_slo_s=10.0, tpot_slo_s=1.0, engine=engine)
                   for i, s in enumerate(MODELS))
    config = WorkerConfig(DeviceConfig("cuda:0", int(budget_gib * GIB)), models, sample_interval_s=0.0)
    worker = DeviceWorker(config, show_progress=False)
    names = list(worker.engines)
    gen = torch.Generator().manual_seed(0)
    step_times = defaultdict(list)
    t_start = time.perf_counter()
    try:
        # Wave k starts on model k once wave k-1's prefills are done: loads overlap, then fade.
        for _wave, name in enumerate(names + names[:2]):
            for _ in range(per_wave):
                ids = torch.randint(0, 32000, (prompt_len,), generator=gen).tolist()
                worker.add_request(name, ids, SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True))
            for _ in range(12):
                _step(worker, step_times)
        while worker.has_unfinished:
            _step(worker, step_times)
        samples = list(worker.metrics.samples)
        counters = {k: dict(v) for k, v in vars(worker.counters).items()}
    finally:
        worker.close()
    for s in samples:
        s["time"] -= t_start
    peaks = {m: max(s["models"][m]["kv_pages"] for s in samples) for m in names}
    return dict(models=names, budget_gib=budget_gib, prompt_len=prompt_len, out_len=out_len,
                requests_per_wave=per_wave, wall_s=time.perf_counter() - t_start,
                peak_kv_pages=peaks, counters=counters,
                step_ms={m: _percentiles(v) for m, v in step_times.items()}, samples=samples)


def _step(worker: DeviceWorker, step_times) -> None:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = worker.step()
    torch.cuda.synchronize()
    if out.ran_model is not None:
        step_times[out.ran_model].append((time.perf_counter() - t0) * 1e3)


def _percentiles(values: list[float]) -> dict:
    v = sorted(values)
    return dict(n=len(v), p50=v[len(v) // 2], p90=v[int(0.9 * (len(v) - 1))], max=v[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-gib", type=float, default=60.0)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out-len", type=int, default=48)
    ap.add_argument("--per-wave", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    card = torch.cuda.get_device_name(0)
    h2d = measure_h2d_bandwidth("cuda:0", num_bytes=2 * GIB)
    act = activation("llama-3.1-8b:random", h2d)
    share = sharing(args.budget_gib, args.prompt_len, args.out_len, args.per_wave)
    date = datetime.date.today().isoformat()
    result = dict(benchmark="device_sharing", card=card, date=date, torch=torch.__version__,
                  command="python3 " + " ".join(sys.argv), ceilings={"h2d_GBps": h2d / 1e9},
                  activation=act, sharing=share)
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    out = Path(args.out or f"benchmarks/results/device-sharing-{slug}-{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _print_summary(card, h2d, act, share, out)
    return 0


def _print_summary(card, h2d, act, share, out) -> None:
    print(f"\n{card}: pinned host->device {h2d / 1e9:.1f} GB/s")
    print(f"activate {act['model']} ({act['weight_bytes'] / GIB:.1f} GiB): {act['activation_s'] * 1e3:.0f} ms "
          f"vs bound {act['h2d_bound_s'] * 1e3:.0f} ms (ratio {act['ratio']:.2f}); free GiB resident "
          f"{act['free_gib_resident']:.1f} -> evicted {act['free_gib_evicted']:.1f}; intact: "
          f"{act['weights_intact_after_reactivation']}")
    page_mib = share["samples"][0]["page_size"] / (1 << 20)
    print(f"sharing {len(share['models'])} models in {share['budget_gib']} GiB, wall {share['wall_s']:.0f} s")
    print(f"{'model':<22} {'peak KV GiB':>11} {'steps':>6} {'p50 ms':>7} {'p90 ms':>7}")
    for m in share["models"]:
        st = share["step_ms"].get(m, dict(n=0, p50=0, p90=0))
        print(f"{m:<22} {share['peak_kv_pages'][m] * page_mib / 1024:>11.2f} {st['n']:>6} "
              f"{st['p50']:>7.1f} {st['p90']:>7.1f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
