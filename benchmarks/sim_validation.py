"""Simulated vs real: the same trace, config, systems and rate scales, compared point by point.

Give it the folder of a real sweep (`prism bench sweep --out DIR`: requests-<system>-x<scale>.jsonl
per point; `prism bench replay --out DIR` works too, as requests.jsonl of --system at scale 1),
the config and trace that sweep ran, and the profiles of the card it ran on. For every real
point it simulates the same system on the same scaled trace (the same rate-scale seed) and
writes a table of TTFT and TPOT p50 / p99 and attainment, real vs simulated, with relative
errors, and whether the systems come out in the same order at each scale.

    python benchmarks/sim_validation.py --real runs/h100-sweep --config examples/h100.yaml \\
        --trace benchmarks/traces/alibaba-busiest-10min-timex0.15-azureconv.jsonl \\
        --profiles benchmarks/profiles/nvidia-h100 --out benchmarks/results/sim-validation-h100
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_log beside this script

from prism.cli.replay import add_slo_options, resolve_slos
from prism.bench.plots import plot_latency_cdfs
from prism.bench.records import load_records, save_records
from prism.bench.report import summarize
from prism.cluster.systems import SYSTEM_NAMES as SYSTEMS
from prism.bench.trace import load_trace
from prism.bench.transforms import scale_rate
from prism.sim.costs import HOST_FILE, HostOverheads, ProfileSet
from prism.sim.run import config_for, read_raw_config, simulate
from prism.sim.sweep import default_jobs, parallel_map

METRICS = (  # (key, label, how to read it from an overall summary)
    ("ttft_p50", "TTFT p50 (s)", lambda s: s["ttft_s"]["p50"]),
    ("ttft_p99", "TTFT p99 (s)", lambda s: s["ttft_s"]["p99"]),
    ("tpot_p50", "TPOT p50 (ms)", lambda s: _ms(s["tpot_s"]["p50"])),
    ("tpot_p99", "TPOT p99 (ms)", lambda s: _ms(s["tpot_s"]["p99"])),
    ("ttft_att", "TTFT att.", lambda s: s["ttft_attainment"]),
    ("tpot_att", "TPOT att.", lambda s: s["tpot_attainment"]),
    ("slo_att", "both att.", lambda s: s["slo_attainment"]),
)
_FILE = re.compile(r"requests-(?P<system>[a-z]+)-x(?P<scale>[0-9.eE+-]+?)\.jsonl(\.gz)?")


def _ms(x):
    return None if x is None else 1e3 * x


def real_points(folder: Path, system: str | None) -> list[tuple[str, float, Path]]:
    """(system, scale, records file) of every point of a real sweep (or one replay)."""
    points = []
    for path in sorted(folder.glob("requests-*.jsonl*")):
        m = _FILE.fullmatch(path.name)
        if m and m["system"] in SYSTEMS:
            points.append((m["system"], float(m["scale"]), path))
    if not points and (folder / "requests.jsonl").is_file():
        if system is None:
            raise ValueError(f"{folder}: requests.jsonl of one replay: say which system ran it (--system)")
        points.append((system, 1.0, folder / "requests.jsonl"))
    if not points:
        raise ValueError(f"{folder}: no requests-<system>-x<scale>.jsonl (prism bench sweep) or requests.jsonl")
    return points


def compare(real_summary: dict, sim_summary: dict) -> dict:
    row = {}
    for key, _, get in METRICS:
        r, s = get(real_summary), get(sim_summary)
        err = None if r in (None, 0) or s is None else (s - r) / r
        row[key] = {"real": r, "sim": s, "rel_err": err}
    return row


def same_order(rows: list[dict], key: str) -> dict[float, bool]:
    """Per scale: do real and simulated runs rank the systems alike by `key` (ties allowed)?"""
    out = {}
    for scale in sorted({r["scale"] for r in rows}):
        at = [r for r in rows if r["scale"] == scale]
        if len(at) < 2:
            continue
        ok = True
        for a in at:
            for b in at:
                ra, rb = a["metrics"][key]["real"], b["metrics"][key]["real"]
                sa, sb = a["metrics"][key]["sim"], b["metrics"][key]["sim"]
                if None not in (ra, rb, sa, sb) and ra > rb and sa < sb:
                    ok = False
        out[scale] = ok
    return out


def validate(real_dir: Path, raw: dict, trace, slos, profiles: ProfileSet, out: Path,
             system: str | None = None, jobs: int | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    duration = max(r.arrival_s for r in trace)

    def one(point):
        system_, scale, path = point
        real = load_records(path)
        scaled = scale_rate(trace, scale, seed=0)  # the seed `prism bench sweep` uses
        result = simulate(config_for(raw, system_), scaled, profiles)
        save_records(out / f"requests-{system_}-x{scale:g}.jsonl", result.records)
        for metric in ("ttft", "tpot"):
            plot_latency_cdfs({"real": real, "simulated": result.records},
                              out / f"{metric}-{system_}-x{scale:g}.png", metric=metric)
        real_s = summarize(real, slos, duration)["overall"]
        sim_s = summarize(result.records, slos, duration)["overall"]
        return {"system": system_, "scale": scale, "requests": len(real), "sim_requests": len(result.records),
                "sim_wall_s": round(result.wall_s, 2), "metrics": compare(real_s, sim_s)}

    rows = parallel_map(one, real_points(real_dir, system), jobs or default_jobs())
    report = {"real": str(real_dir), "cost_sources": _sources(raw, trace, profiles), "rows": rows,
              "host": {"step_overhead_ms": 1e3 * profiles.host.step_s, "request_latency_ms": 1e3 * profiles.host.request_s,
                       "scheduling_scale": profiles.host.scheduling_scale,
                       "seq_overhead_us": 1e6 * profiles.host.seq_s,
                       "cold_shape_ms": 1e3 * profiles.host.cold_shape_s,
                       "server_has_profiles": profiles.host.server_has_profiles,
                       **_launch_report(profiles.host)},
              "same_order": {"ttft_att": same_order(rows, "ttft_att"), "slo_att": same_order(rows, "slo_att")}}
    (out / "validation.json").write_text(json.dumps(report, indent=1))
    (out / "validation.md").write_text(markdown(report))
    return report


def calibrated(profiles: ProfileSet, raw: dict, solo, keep_step_times: bool = False,
               solo_steps: Path | None = None) -> ProfileSet:
    """`profiles` with host overheads measured from requests served alone: the request latency
    and, unless `keep_step_times` (fitted to step logs already), the per-step time. With the
    step log of the server that served them (`solo_steps`), the request latency is what each
    spent outside its prefill step (step_log.request_latency); without, TTFT less the profile's
    prefill, less the cold-shape cost where the request was the first of its shape class."""
    import step_log

    from prism.sched.cost import ProfileCostModel
    from prism.sim.shapes import model_shape

    config = config_for(raw, "prism")
    device = config.devices[0].device
    shapes = {m.name: model_shape(m, device) for m in config.models}
    per_model = {name: profiles.profile_for(shape, device)[0] for name, shape in shapes.items()}
    keys = {name: shape.kernel_key for name, shape in shapes.items()}
    solo_host = HostOverheads.from_solo(solo, ProfileCostModel(per_model), profiles.host.cold_shape_s, keys.__getitem__)
    host = dataclasses.replace(profiles.host, request_s=solo_host.request_s) if keep_step_times else solo_host
    if solo_steps is not None:
        host = dataclasses.replace(host, request_s=step_log.request_latency(solo, solo_steps)[0])
    return dataclasses.replace(profiles, host=host, _memo={})


def fitted_to_steps(profiles: ProfileSet, config: str, logs: list[str]) -> tuple[ProfileSet, int]:
    """`profiles` with the per-step, per-sequence and cold-shape host times fitted to real
    step logs (request latency kept), and the number of busy steps fitted."""
    import step_log

    files = step_log.log_files(logs)
    cost = step_log.cost_model(config, profiles)
    steps = step_log.read_steps(files, cost)
    step_s, seq_s = step_log.fit_host(steps)
    cold_s, _, _ = step_log.fit_cold_shapes(files, cost, step_log.shape_keys(config))
    host = dataclasses.replace(profiles.host, step_s=step_s, seq_s=seq_s, cold_shape_s=cold_s)
    return dataclasses.replace(profiles, host=host, _memo={}), len(steps)


def with_host_overheads(profiles: ProfileSet, args, raw: dict) -> ProfileSet:
    """The host overheads asked for on the command line (step logs first: the solo figure
    subtracts the cold-shape cost they give), saved to OUT/host.yaml."""
    notes = []
    if args.host_steps:
        profiles, num_steps = fitted_to_steps(profiles, args.config, args.host_steps)
        notes.append(f"step, sequence and cold-shape times fitted to {num_steps} busy steps of {', '.join(args.host_steps)}")
    if args.calibrate_host:
        solo_steps = Path(args.solo_steps) if args.solo_steps else None
        profiles = calibrated(profiles, raw, load_records(args.calibrate_host), bool(args.host_steps), solo_steps)
        notes.append(f"request latency{'' if args.host_steps else ' and step time'} from the requests served alone "
                     f"in {args.calibrate_host}" + (f" against their steps in {solo_steps}" if solo_steps else ""))
    if args.launch_steps:
        import step_log

        launch = step_log.fit_launch(step_log.log_files(args.launch_steps), step_log.config_launch_models(args.config))
        profiles = dataclasses.replace(profiles, host=launch.host(profiles.host), _memo={})
        notes.append(f"launch model fitted to {launch.num_steps} steps of {', '.join(args.launch_steps)}, "
                     "the models of a device on one host thread")
    if notes:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        profiles.host.save(out / HOST_FILE, note="; ".join(notes) + " (benchmarks/sim_validation.py)")
    return profiles


def _launch_report(host: HostOverheads) -> dict:
    """The launch model in the report, where one is on (reports without it stay as they were)."""
    if not host.one_host_thread:
        return {}
    return {"one_host_thread": True, "launch_ms": 1e3 * host.launch_s, "launch_seq_us": 1e6 * host.launch_seq_s,
            "launch_prefill_layer_us": 1e6 * host.launch_prefill_layer_s,
            "launch_eager_layer_us": 1e6 * host.launch_eager_layer_s}


def _sources(raw, trace, profiles) -> dict:
    first = trace[:1]
    result = simulate(config_for(raw, "prism"), first, profiles) if first else None
    return result.cost_sources if result else {}


def _fmt(key: str, x) -> str:
    if x is None:
        return "-"
    if key.endswith("_att"):
        return f"{x:.1%}"
    return f"{x:.0f}" if key.startswith("tpot") else f"{x:.2f}"


def comparison_cell(key: str, m: dict) -> str:
    """'real / other (relative error)' of one metric of `compare`."""
    err = "" if m["rel_err"] is None else f" ({m['rel_err']:+.0%})"
    return f"{_fmt(key, m['real'])} / {_fmt(key, m['sim'])}{err}"


def markdown(report: dict) -> str:
    lines = ["Real vs simulated, per system and rate scale (relative error = (sim - real) / real):", "",
             "| system | scale | requests |" + "".join(f" {label} real / sim (err) |" for _, label, _ in METRICS),
             "|---|---:|---:|" + "---|" * len(METRICS)]
    for r in sorted(report["rows"], key=lambda r: (r["scale"], r["system"])):
        cells = ""
        for key, _, _ in METRICS:
            cells += f" {comparison_cell(key, r['metrics'][key])} |"
        lines.append(f"| {r['system']} | {r['scale']:g} | {r['requests']} |{cells}")
    lines += ["", "Same order of systems (real vs simulated) at each scale:"]
    for key, label in (("ttft_att", "TTFT attainment"), ("slo_att", "both SLOs")):
        verdict = report["same_order"][key]
        text = ", ".join(f"x{s:g}: {'yes' if ok else 'no'}" for s, ok in verdict.items()) or "one system only"
        lines.append(f"- by {label}: {text}")
    lines += ["", "Cost sources: " + ", ".join(f"{m}: {how}" for m, how in report["cost_sources"].items()) + ".",
              f"Host overheads: {report['host']['step_overhead_ms']:.2f} ms per step + "
              f"{report['host'].get('seq_overhead_us', 0):.1f} us per sequence in it, "
              f"{report['host']['request_latency_ms']:.1f} ms per request, "
              f"{report['host'].get('cold_shape_ms', 0):.1f} ms for a fresh server's first eager step of a shape class; "
              f"scheduling time charged x"
              f"{report['host']['scheduling_scale']:g}; the servers " +
              ('planned with these profiles' if report['host']['server_has_profiles']
               else 'had no profiles to plan with') + "."]
    h = report["host"]
    if h.get("one_host_thread"):
        lines.append(f"Launches on one host thread per device: {h['launch_ms']:.3f} ms + {h['launch_seq_us']:.1f} us "
                     f"per sequence + {h['launch_prefill_layer_us']:.1f} us per layer with prefill tokens "
                     f"+ {h['launch_eager_layer_us']:.1f} us per layer beyond the graph cap.")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", required=True, help="folder of a real sweep (or replay)")
    p.add_argument("--config", required=True)
    p.add_argument("--trace", required=True)
    p.add_argument("--profiles", default=None, help="profiles of the card the real runs used")
    p.add_argument("--system", default=None, help="the system of a single replay's requests.jsonl")
    p.add_argument("--scheduling-scale", type=float, default=None,
                   help="charge each step this many times its scheduling code's wall time here (HostOverheads)")
    p.add_argument("--server-without-profiles", action="store_true",
                   help="the real server had no profiles installed: its schedulers planned from the card's nominal rates")
    p.add_argument("--calibrate-host", metavar="RECORDS", default=None,
                   help="requests.jsonl of a solo run on the same server (requests one at a time): "
                        "measure the host overheads from it (written to OUT/host.yaml) instead of PROFILES/host.yaml")
    p.add_argument("--solo-steps", metavar="FILE", default=None,
                   help="with --calibrate-host: the step log of the server that served RECORDS; the request "
                        "latency is then each solo request's TTFT less its prefill step's wall time")
    p.add_argument("--host-steps", nargs="+", metavar="DIR", default=None,
                   help="step logs of the real runs (PRISM_STEP_LOG folders or files): fit the per-step, "
                        "per-sequence and cold-shape host time to them (benchmarks/step_log.py) instead of the solo figure")
    p.add_argument("--launch-steps", nargs="+", metavar="DIR", default=None,
                   help="step logs of real runs at their own pace: fit the launch model to them (benchmarks/step_log.py "
                        "fit_launch) and simulate each device's models on one host thread (HostOverheads.one_host_thread)")
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=None)
    add_slo_options(p, required=False)
    args = p.parse_args(argv)
    try:
        raw = read_raw_config(args.config)
        trace = load_trace(args.trace)
        slos = resolve_slos(args, sorted({r.model for r in trace}), default_config=args.config)
        profiles = ProfileSet.load(args.profiles)
        profiles = with_host_overheads(profiles, args, raw)
        if args.scheduling_scale is not None or args.server_without_profiles:
            host = profiles.host
            if args.scheduling_scale is not None:
                host = dataclasses.replace(host, scheduling_scale=args.scheduling_scale)
            if args.server_without_profiles:
                host = dataclasses.replace(host, server_has_profiles=False)
            profiles = dataclasses.replace(profiles, host=host, _memo={})
        report = validate(Path(args.real), raw, trace, slos, profiles, Path(args.out), args.system, args.jobs)
    except (ValueError, OSError) as e:
        print(f"sim_validation: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(markdown(report), end="")
    print(f"wrote {Path(args.out) / 'validation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
