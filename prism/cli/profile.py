"""`prism profile`: measure a model's prefill and decode times on a device, write the profile
JSON the cost model reads (prism.sched.cost), print a short table. With `--pair-with B`:
measure the model's steps and B's side by side instead (prism.engine.pair_profiler), fit the
rates such turns reach under each contention rule, keep the rule that reproduces them better and
write it with its rates (`concurrency.yaml`, prism.sched.concurrency)."""
from __future__ import annotations

import dataclasses
import statistics
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
                   "~/.cache/prism/profiles/<model>-<device>.json; with --pair-with, concurrency.yaml there)")
    p.add_argument("--pair-with", default=None, metavar="MODEL",
                   help="measure --model's steps and this model's side by side (one turn, a stream each) "
                   "and write the rates such turns reach, which the simulator charges them at")
    p.add_argument("--streams", type=float, default=0.0, metavar="SECONDS",
                   help="with --pair-with: also run each case as models at their own pace do (each step "
                   "relaunched once done, alone and side by side, SECONDS each) and show what each rule predicts")
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
    if args.pair_with:
        return run_pair_profile(args)
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


def run_pair_profile(args) -> int:
    import datetime

    from prism.engine import pair_profiler as pairs
    from prism.env import profile_dir
    from prism.sched.concurrency_profile import CONCURRENCY_FILE, ConcurrencyProfile
    from prism.sim.costs import card_defaults

    if args.out and not args.out.endswith((".yaml", ".yml")):
        raise UserError(f"--out {args.out}: with --pair-with the rates go to a YAML file "
                        f"(the simulator reads {CONCURRENCY_FILE} in the profile folder)")
    if args.quick:
        grid = (pairs.QUICK_PAIR_DECODES, pairs.QUICK_PAIR_PREFILLS, pairs.QUICK_BESIDE)
    else:
        grid = (pairs.DEFAULT_PAIR_DECODES, pairs.DEFAULT_PAIR_PREFILLS, pairs.DEFAULT_BESIDE)
    if args.streams < 0:
        raise UserError(f"--streams must be >= 0 seconds, got {args.streams}")
    turns, streams, card, elapsed = measure_pair(args, pairs.pair_cases(*grid))
    if not turns:
        raise UserError("no case fits the two models' memory and context: give --memory more")
    command = (f"prism profile --model {args.model} --pair-with {args.pair_with} --device {args.device}"
               + (" --quick" if args.quick else "") + f" --repeats {args.repeats}"
               + (f" --streams {args.streams:g}" if args.streams else ""))
    nominal = card_defaults(args.device)
    profile = ConcurrencyProfile.fitted(turns, nominal, card, args.device, datetime.date.today().isoformat(),
                                        command, streams)
    out = profile.save(args.out or profile_dir() / CONCURRENCY_FILE)
    print_turns(profile, nominal)
    if streams:
        print_streams(profile, nominal)
    print(f"measured in {elapsed:.1f} s; wrote {out}")
    return 0


def measure_pair(args, cases) -> tuple[list, list, str, float]:
    """Both models on one page pool, each on a stream of its own, as a worker with
    concurrent_models runs them; (the measured turns, the measured streams (--streams), the
    card, seconds measuring)."""
    import torch

    from prism.config import DeviceConfig, EngineConfig
    from prism.engine.llm_engine import LLMEngine
    from prism.engine.pair_profiler import profile_pair, profile_streams
    from prism.engine.profiler import device_name

    device = DeviceConfig(device=args.device, memory_bytes=args.memory or default_memory(args.device))
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    max_batch = max(step.batch for case in cases for step in case)
    engine_config = EngineConfig(max_num_batched_tokens=8192, max_num_seqs=max(64, max_batch), own_stream=True)
    first = LLMEngine(args.model, engine_config, device, dtype=dtype, show_progress=True)
    try:
        second_id = args.pair_with + "#2" if args.pair_with == args.model else None  # one name each
        second = LLMEngine(args.pair_with, engine_config, device, pool=first.pool, dtype=dtype,
                           model_id=second_id, show_progress=True)
        try:
            start = time.perf_counter()
            turns = profile_pair(first, second, cases, repeats=args.repeats)
            streams = profile_streams(first, second, cases, args.streams) if args.streams else []
            return turns, streams, device_name(first.device), time.perf_counter() - start
        finally:
            second.close()
    finally:
        first.close()


def print_turns(profile, nominal) -> None:
    fitted = profile.rates(nominal)
    print(f"steps side by side on {profile.device} ({profile.card}): memory "
          f"{fitted.memory_bytes_per_s / 1e9:.4g} GB/s (nominal {nominal.memory_bytes_per_s / 1e9:.4g}), matmul "
          f"{fitted.flops_per_s / 1e12:.4g} TFLOP/s (nominal {nominal.flops_per_s / 1e12:.4g})")
    losses = ", ".join(f"{rule.value} {loss:.3g}" for rule, loss in profile.losses.items()) or "not recorded"
    print(f"contention rule: {profile.rule.value} (mean squared log error of each rule's fit: {losses})")
    print_turn_table(profile.turns, {"nominal": (nominal, profile.rule), "fitted": (fitted, profile.rule)})


def print_streams(profile, nominal) -> None:
    """Each step's period relaunched side by side, measured and as each account predicts it
    (each fluid rule at its rates fitted to the turns; interleaving at its fitted wait)."""
    from prism.sched.concurrency_profile import fit_contention, fit_pace, pace_accounts

    fit = fit_contention(profile.turns, nominal)
    pace = fit_pace(profile.streams, fit)
    accounts = pace_accounts(fit, pace)
    print("\nsteps relaunched at their own pace: period side by side (ms), measured and predicted")
    print(f"{'case':<34} {'step':>14} {'alone':>8} {'side':>8} " + " ".join(f"{n[:16]:>16}" for n in accounts))
    for m in profile.streams:
        predicted = [periods(m.steps) for periods in accounts.values()]
        for i, step in enumerate(m.steps):
            print(f"{m.case if i == 0 else '':<34} {step.model[:14]:>14} {step.alone_s * 1e3:>8.2f} "
                  f"{m.side_s[i] * 1e3:>8.2f} " + " ".join(f"{p[i] * 1e3:>16.2f}" for p in predicted))
    for name, loss in pace.losses.items():
        print(f"{name}: mean squared log error {loss:.4f}")
    print(f"at their own pace: {profile.pace_account}")


def print_turn_table(turns, charges: dict) -> None:
    """Each measured turn beside what the simulator charges for it under each of `charges`
    (by name: rates and contention rule), and the error of the last of them; then each one's
    median and largest error."""
    from prism.sched.concurrency_profile import predicted_turn

    names = list(charges)
    print(f"\n{'case':<34} {'alone ms':>17} {'turn ms':>9} " + " ".join(f"{n[:9]:>9}" for n in names) + f" {'error':>7}")
    for t in turns:
        alone = " + ".join(f"{s.alone_s * 1e3:.2f}" for s in t.steps)
        charged = [predicted_turn(charges[n][0], t.steps, charges[n][1]) for n in names]
        print(f"{t.case:<34} {alone:>17} {t.turn_s * 1e3:>9.2f} " + " ".join(f"{c * 1e3:>9.2f}" for c in charged)
              + f" {charged[-1] / t.turn_s - 1:>+7.1%}")
    for name in names:
        errors = [abs(predicted_turn(charges[name][0], t.steps, charges[name][1]) / t.turn_s - 1) for t in turns]
        print(f"{name} ({charges[name][1].value}): median |error| {statistics.median(errors):.1%}, largest {max(errors):.1%}")
