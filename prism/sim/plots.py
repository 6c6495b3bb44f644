"""PNG plots of simulated capacity plans (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

from prism.bench.plots import plt, save_figure


def plot_plan(result: dict, path: str | Path) -> None:
    """Left: SLO attainment (requests meeting both TTFT and TPOT) against GPUs, one line per policy (and group size
    when there are several); right: the fewest GPUs that meet the target, per policy."""
    target, cap = result["target"], result["max_gpus"]
    classes = [c["gpus"] for c in result["classes"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    policies = list(result["policies"])
    colors = {s: f"C{i}" for i, s in enumerate(policies)}
    styles = ("-", "--", ":", "-.")
    for s in policies:
        for k, g in enumerate(classes):
            pts = sorted((p["gpus"], p["slo_attainment"] if p["runs"] else 0.0,
                          p.get("stopped_early", False))
                         for p in result["points"] if p["system"] == s and p["class_gpus"] == g
                         and (not p["runs"] or p["slo_attainment"] is not None))  # no traffic: no point
            if pts:
                label = s if len(classes) == 1 else f"{s} (groups of {g})"
                left.plot([x for x, _, _ in pts], [100 * y for _, y, _ in pts], color=colors[s],
                          linestyle=styles[k % len(styles)], label=label)
                # hollow: the run stopped once the target was out of reach (a lower bound)
                for x, y, stopped in pts:
                    left.plot([x], [100 * y], marker="o", color=colors[s],
                              markerfacecolor="white" if stopped else colors[s])
    left.axhline(100 * target, color="gray", linestyle="--", linewidth=1)
    if any(p.get("stopped_early") for p in result["points"]):
        left.plot([], [], marker="o", color="gray", markerfacecolor="white", linestyle="none",
                  label="stopped early (lower bound)")
    left.set(xlabel="GPUs", ylabel="SLO attainment, both met (%)", ylim=(0, 102),
             title="SLO attainment vs cluster size (simulated)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    needed = [result["policies"][s]["gpus"] for s in policies]
    bars = right.bar(policies, [cap + 1 if n is None else n for n in needed],
                     color=[colors[s] for s in policies])
    for bar, n in zip(bars, needed):
        if n is None:
            bar.set_hatch("//")
            bar.set_alpha(0.4)
        right.annotate(f"> {cap}" if n is None else str(n), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                       ha="center", va="bottom", fontsize=9)
    right.set(ylabel="GPUs", title=f"fewest GPUs for {target:.0%} attainment")
    right.grid(alpha=0.3, axis="y")
    save_figure(fig, path)
