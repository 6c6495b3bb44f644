"""`prism profile`: measure a model's prefill and decode times on a device, write the profile
JSON the cost model reads (prism.sched.cost), print a short table."""
from __future__ import annotations

import dataclasses
import time

from prism.cli.common import default_memory, size_arg
from prism.errors import UserError


def add_profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure prefill and decode times of a model on a device")
    p.add_argument("--model", required=True, help="catalog name (e.g. llama-3.1-8b:random), HF folder, .gguf file or config.json")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--memory", type=size_arg, default=None,
                   help="device page budget (default: 4GiB on CPU, 90%% of free GPU memory)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--out", default=None, help="profile JSON to write (default: $PRISM_PROFILE_DIR or "
                   "~/.cache/prism/profiles/<model>-<device>.json)")
    p.add_argument("--quick", action="store_true", help="fewer cases (a rough profile in seconds)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case, after one warm-up")
    p.set_defaults(func=run_profile)


def run_profile(args) -> int:
    import torch

    from prism.config import DeviceConfig, EngineConfig
    from prism.engine import profiler
    from prism.engine.llm_engine import LLMEngine
    from prism.env import profile_dir
    from prism.sched.cost import default_profile_path

    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {args.device} asked for but CUDA is not available")
    if args.quick:
        cases = (profiler.QUICK_PREFILL_LENGTHS, profiler.QUICK_BATCH_SIZES,
                 profiler.QUICK_CONTEXT_LENGTHS)
        mixed = profiler.QUICK_MIXED
    else:
        cases = (profiler.DEFAULT_PREFILL_LENGTHS, profiler.DEFAULT_BATCH_SIZES,
                 profiler.DEFAULT_CONTEXT_LENGTHS)
        mixed = profiler.DEFAULT_MIXED
    device = DeviceConfig(device=args.device, memory_bytes=args.memory or default_memory(args.device))
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    # The token budget only groups the prefills that fill KV before decode cases.
    engine_config = EngineConfig(max_num_batched_tokens=8192)
    engine = LLMEngine(args.model, engine_config, device, dtype=dtype, show_progress=True)
    try:
        start = time.perf_counter()
        profile = profiler.profile_engine(engine, *cases, repeats=args.repeats, mixed_cases=mixed)
        if engine.device.type == "cuda":
            profile = dataclasses.replace(
                profile, h2d_bytes_per_s=profiler.measure_h2d_bandwidth(engine.device))
        elapsed = time.perf_counter() - start
    finally:
        engine.close()
    out = profile.save(args.out or default_profile_path(profile_dir(), args.model, args.device))
    print_profile(profile)
    print(f"profiled in {elapsed:.1f} s; wrote {out}")
    return 0


def print_profile(profile) -> None:
    print(f"{profile.model} on {profile.device} ({profile.card}), {profile.dtype}, "
          f"weights {profile.weight_bytes / 2**30:.2f} GiB, "
          f"KV {profile.kv_bytes_per_token / 1024:.1f} KiB/token")
    if profile.h2d_bytes_per_s:
        print(f"host -> device copy: {profile.h2d_bytes_per_s / 1e9:.1f} GB/s")
    print(f"\n{'prefill tokens':>14} {'ms':>9} {'tokens/s':>10}")
    for (n, t), (_, rate) in zip(profile.prefill, profile.prefill_tokens_per_s):
        print(f"{n:>14} {t * 1e3:>9.2f} {rate:>10.0f}")
    print(f"\n{'decode batch':>12} {'context':>8} {'step ms':>9} {'tokens/s':>10}")
    for b, c, t in profile.decode:
        print(f"{b:>12} {c:>8} {t * 1e3:>9.2f} {b / t:>10.0f}")
    if profile.mixed:
        print(f"\n{'mixed: prefill':>14} {'batch':>6} {'context':>8} {'step ms':>9}")
        for p, b, c, t in profile.mixed:
            print(f"{p:>14} {b:>6} {c:>8} {t * 1e3:>9.2f}")
