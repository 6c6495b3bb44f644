"""`prism plan`: the fewest GPUs on which each serving system meets an SLO attainment target.

The config gives the models and one device (the first entry) as the template of every GPU;
the planner varies how many there are. A model whose weights exceed `group_weight_fraction`
of one GPU's memory runs on a tensor-parallel group of 2, 4, ... GPUs (the smallest where
they stay within that fraction), so models fall into classes by group size. Each class gets
devices of its own (a 70B model's group does not host 1B models) and is planned on its own
share of the trace; a class's answer is its devices times its group size, and a system's
answer the sum over classes: every class meets the target, so the whole trace does.

Per (system, class) the search is galloping then binary: 1, 2, 4, ... devices until the target
is met (or the limit), then bisection between the last miss and the first hit. It assumes
attainment does not fall when devices are added, which holds for every system here but for
scheduling noise; every evaluated point is kept in the result, so a non-monotone curve shows.
A system that cannot run on some size (static and muxserve keep every model resident, so the
weights must fit) counts as missing the target there.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from prism.bench.report import SLOTargets, summarize
from prism.bench.trace import TraceRequest
from prism.cluster.systems import system_spec
from prism.config import ConfigError, size_bytes
from prism.errors import UserError
from prism.sim.cluster import EarlyStop
from prism.sim.costs import ProfileSet
from prism.sim.run import config_for, simulate
from prism.sim.shapes import model_shape
from prism.sim.sweep import default_jobs, parallel_map


@dataclass(frozen=True)
class ModelClass:
    gpus: int  # GPUs per device (1: a single GPU, k: a tensor-parallel group of k)
    models: tuple[str, ...]


@dataclass(frozen=True)
class Point:
    system: str
    class_gpus: int
    devices: int
    gpus: int
    ttft_attainment: float | None
    tpot_attainment: float | None
    slo_attainment: float | None
    runs: bool  # False: the system cannot run on this cluster (the weights do not fit)
    sim_wall_s: float = 0.0
    stopped_early: bool = False  # the target was out of reach: attainment is a lower bound

    def meets(self, target: float) -> bool:
        """The share of requests that meet both their TTFT and their TPOT SLO reaches `target`."""
        if not self.runs:
            return False
        if self.slo_attainment is None:  # no requests for these models: holding them is enough
            return True
        return self.slo_attainment >= target


# ---- clusters of n devices ------------------------------------------------------------------------
def model_classes(raw: dict, group_weight_fraction: float = 0.5) -> list[ModelClass]:
    config = config_for(raw, "prism")
    template = config.devices[0]
    by_gpus: dict[int, list[str]] = {}
    for spec in config.models:
        weight_bytes = model_shape(spec, template.device).weight_bytes
        g = 1
        while weight_bytes > group_weight_fraction * g * template.memory_bytes:
            g *= 2
        by_gpus.setdefault(g, []).append(spec.name)
    return [ModelClass(g, tuple(names)) for g, names in sorted(by_gpus.items())]


def cluster_raw(raw: dict, cls: ModelClass, num_devices: int) -> dict:
    """The config of `num_devices` devices of the class's group size, serving its models."""
    template = dict(raw["devices"][0])
    kind = "cpu" if str(template["device"]).startswith("cpu") else "cuda"
    memory = size_bytes(template["memory"]) * cls.gpus
    devices = [dict(template, device=f"{kind}:{i}", memory=memory, gpus=cls.gpus) for i in range(num_devices)]
    models = [{k: v for k, v in m.items() if k != "device"} for m in raw["models"] if m["name"] in cls.models]
    return {**raw, "devices": devices, "models": models}


def evaluate(raw: dict, system: str, cls: ModelClass, num_devices: int, trace: list[TraceRequest],
             slos: dict[str, SLOTargets], profiles: ProfileSet, target: float,
             early_stop: bool = True) -> Point:
    mine = [r for r in trace if r.model in cls.models]
    gpus = num_devices * cls.gpus
    # Once more requests missed their TTFT than the target allows, the answer is known (a TTFT
    # miss misses both SLOs): stop.
    stop = EarlyStop({m: s.ttft_s for m, s in slos.items()}, int((1 - target) * len(mine))) if early_stop else None
    try:
        result = simulate(config_for(cluster_raw(raw, cls, num_devices), system), mine, profiles,
                          early_stop=stop)
    except ConfigError:  # e.g. static/muxserve: the weights fit on no device
        return Point(system, cls.gpus, num_devices, gpus, None, None, None, runs=False)
    duration = max((r.arrival_s for r in mine), default=0.0)
    o = summarize(result.records, slos, max(duration, 1e-9)).get("overall", {})
    return Point(system, cls.gpus, num_devices, gpus, o.get("ttft_attainment"), o.get("tpot_attainment"),
                 o.get("slo_attainment"), runs=True, sim_wall_s=round(result.wall_s, 2),
                 stopped_early=result.stopped_at is not None)


# ---- the search ---------------------------------------------------------------------------------
def fewest_devices(system: str, cls: ModelClass, max_devices: int, target: float, check) -> tuple[int | None, list[Point]]:
    """(fewest devices meeting the target or None, every point evaluated). `check(n)` -> Point."""
    points: dict[int, Point] = {}

    def meets(n: int) -> bool:
        if n not in points:
            points[n] = check(n)
        return points[n].meets(target)

    if system_spec(system).device_per_model:  # by definition
        n = len(cls.models)
        return (n if n <= max_devices and meets(n) else None), list(points.values())
    miss, hit, n = 0, None, 1
    while n <= max_devices:
        if meets(n):
            hit = n
            break
        miss = n
        if n == max_devices:
            break
        n = min(2 * n, max_devices)
    if hit is None:
        return None, sorted(points.values(), key=lambda p: p.devices)
    while hit - miss > 1:  # the first hit lies in (miss, hit]
        mid = (miss + hit) // 2
        if meets(mid):
            hit = mid
        else:
            miss = mid
    return hit, sorted(points.values(), key=lambda p: p.devices)


def plan(raw: dict, trace: list[TraceRequest], systems: list[str], slos: dict[str, SLOTargets],
         profiles: ProfileSet, target: float = 0.99, max_gpus: int = 8,
         group_weight_fraction: float = 0.5, jobs: int | None = None, early_stop: bool = True) -> dict:
    classes = model_classes(raw, group_weight_fraction)
    too_big = [c for c in classes if c.gpus > max_gpus]
    if too_big:
        raise UserError(f"{', '.join(too_big[0].models)} need(s) a group of {too_big[0].gpus} GPUs, "
                         f"more than --max-gpus {max_gpus}")
    cases = [(s, c) for s in systems for c in classes]

    def search(case):
        system, cls = case
        return fewest_devices(system, cls, max_gpus // cls.gpus, target,
                              lambda n: evaluate(raw, system, cls, n, trace, slos, profiles, target, early_stop))

    found = parallel_map(search, cases, jobs or default_jobs())
    policies: dict[str, dict] = {s: {"gpus": 0, "by_class": {}} for s in systems}
    points: list[Point] = []
    for (system, cls), (devices, pts) in zip(cases, found):
        entry = policies[system]
        entry["by_class"][str(cls.gpus)] = None if devices is None else devices * cls.gpus
        entry["gpus"] = None if devices is None or entry["gpus"] is None else entry["gpus"] + devices * cls.gpus
        points += pts
    return {"target": target, "max_gpus": max_gpus, "classes": [asdict(c) for c in classes],
            "policies": policies, "points": [asdict(p) for p in points]}


# ---- output -------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    target, cap = result["target"], result["max_gpus"]
    classes = result["classes"]
    lines = [f"Fewest GPUs with SLO attainment (requests meeting both TTFT and TPOT) >= {target:.0%} "
             f"(simulated; at most {cap} GPUs):", ""]
    head = "| policy | GPUs |" + "".join(f" {_class_label(c)} |" for c in classes)
    lines += [head, "|---|---:|" + "---:|" * len(classes)]
    for s, e in result["policies"].items():
        cells = "".join(f" {_gpus(e['by_class'].get(str(c['gpus'])), cap)} |" for c in classes)
        lines.append(f"| {s} | {_gpus(e['gpus'], cap)} |{cells}")
    lines += ["", "Every simulated point (attainment over the class's share of the trace; '>=': the run "
              "stopped once the TTFT target was out of reach, the rest counted as missed):", "",
              "| policy | group | devices | GPUs | TTFT att. | TPOT att. | both | sim s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(result["points"], key=lambda p: (p["system"], p["class_gpus"], p["devices"])):
        att = [_pc(p[k], p["stopped_early"]) if p["runs"] else "no fit"
               for k in ("ttft_attainment", "tpot_attainment", "slo_attainment")]
        lines.append(f"| {p['system']} | {p['class_gpus']} | {p['devices']} | {p['gpus']} | "
                     f"{att[0]} | {att[1]} | {att[2]} | {p['sim_wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _class_label(c: dict) -> str:
    n = len(c["models"])
    kind = "1 GPU each" if c["gpus"] == 1 else f"groups of {c['gpus']}"
    return f"{n} model{'s' if n != 1 else ''} on {kind}"


def _gpus(value, cap: int) -> str:
    return f"> {cap}" if value is None else str(value)


def _pc(x, lower_bound: bool = False) -> str:
    return "-" if x is None else f"{'>= ' if lower_bound else ''}{x:.1%}"


def write_plan(result: dict, out_dir: str | Path) -> None:
    from prism.sim.plots import plot_plan

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.json").write_text(json.dumps(result, indent=1))
    (out_dir / "plan.md").write_text(markdown(result))
    plot_plan(result, out_dir / "plan.png")
