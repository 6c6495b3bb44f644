"""The launch model fitted to r1's own-pace step logs against each log's measured call times,
by kind of step (r2-static is held out). Run from the repository root:
    PYTHONPATH=$PWD python benchmarks/results/sim-validation-h100-6models-2026-12-06/launch-model/check_fit.py"""
import statistics
import sys

sys.path.insert(0, "benchmarks")

import step_log  # noqa: E402
from prism.sim.costs import HostOverheads  # noqa: E402

R = "benchmarks/results/h100-6models-2026-12-06/steps/"
CONFIG = "benchmarks/results/sim-validation-h100-6models-2026-12-05/config-equal-rates.yaml"


def main() -> None:
    models = step_log.config_launch_models(CONFIG)
    fit = step_log.fit_launch(step_log.log_files([R + "r1-static", R + "r1-muxserve"]), models)
    host = fit.host(HostOverheads())
    for run in ("r1-static", "r1-muxserve", "r2-static"):
        groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for f in step_log.log_files([R + run]):
            for s in step_log._read_lines(f):
                if not s["terms"]:
                    continue
                d, _, p = s["terms"]
                layers, cap = models[s["model"]]
                eager = bool(p) and d + p > cap
                kind = "decode" if not p else "prefill/mixed > cap" if eager else "prefill/mixed <= cap"
                fitted = host.launch_time(s["seqs"], d + p, p, layers, cap)
                groups.setdefault((kind, s["model"] if eager else "all"), []).append((s["wall_s"], fitted))
        print(f"\n{run}\n\n| step | model | steps | measured p50 (ms) | fitted p50 (ms) | measured mean | fitted mean |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for (kind, model), v in sorted(groups.items()):
            measured, fitted = [a for a, _ in v], [b for _, b in v]
            print(f"| {kind} | {model} | {len(v)} | {1e3 * statistics.median(measured):.2f} | "
                  f"{1e3 * statistics.median(fitted):.2f} | {1e3 * statistics.mean(measured):.2f} | "
                  f"{1e3 * statistics.mean(fitted):.2f} |")


if __name__ == "__main__":
    main()
