"""Which contention rule the measured turns of side-by-side steps pick (prism.sched.concurrency):
for each concurrency.yaml, each turn measured and as charged under each rule at that rule's own
fitted rates, and each rule's loss (mean squared log error over the turns). A short Markdown
table per file; where the file has steps relaunched at their own pace (`prism profile
--streams`), a second one: each step's period side by side, measured and as each rule predicts
it on a SharedChip at the same rates (the check of the rule on what pace "own" runs).

    python3 benchmarks/contention_rules.py CONCURRENCY_YAML...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prism.sched.concurrency import (ConcurrencyProfile, ContentionFit, ContentionRule, fit_contention,
                                     predicted_streams, predicted_turn, streams_loss)
from prism.sim.costs import card_defaults


def report(path: Path) -> str:
    profile = ConcurrencyProfile.load(path)
    if not profile.turns:
        return f"## {path}\n\nno measured turns\n"
    fit = fit_contention(profile.turns, card_defaults(profile.device))
    rules = list(ContentionRule)
    lines = [f"## {path}", "", f"`{profile.command}` ({profile.card}, {profile.device}, {profile.date})", "",
             "| case | alone ms | measured ms | " + " | ".join(f"{r.value} ms" for r in rules) + " |",
             "|---|---:|---:|" + "---:|" * len(rules)]
    for t in profile.turns:
        alone = " + ".join(f"{s.alone_s * 1e3:.2f}" for s in t.steps)
        charged = [predicted_turn(fit.rates[r], t.steps, r) for r in rules]
        lines.append(f"| {t.case.replace('|', '/')} | {alone} | {t.turn_s * 1e3:.2f} | "
                     + " | ".join(f"{c * 1e3:.2f} ({c / t.turn_s - 1:+.1%})" for c in charged) + " |")
    return "\n".join([*lines, "", *summary(fit, profile), "", *streams_table(fit, profile)])


def streams_table(fit: ContentionFit, profile: ConcurrencyProfile) -> list[str]:
    if not profile.streams:
        return []
    rules = list(ContentionRule)
    lines = ["Steps relaunched at their own pace: each one's period (ms) alone, side by side, and as predicted",
             "", "| case | step | alone | measured | " + " | ".join(r.value for r in rules) + " |",
             "|---|---|---:|---:|" + "---:|" * len(rules)]
    for m in profile.streams:
        predicted = [predicted_streams(fit.rates[r], m.steps, r) for r in rules]
        for i, step in enumerate(m.steps):
            lines.append(f"| {m.case.replace('|', '/') if i == 0 else ''} | {step.model} | {step.alone_s * 1e3:.2f} | "
                         f"{m.side_s[i] * 1e3:.2f} | "
                         + " | ".join(f"{p[i] * 1e3:.2f} ({p[i] / m.side_s[i] - 1:+.0%})" for p in predicted) + " |")
    lines += ["", *(f"- {r.value}: loss over the periods {streams_loss(fit.rates[r], profile.streams, r):.4g}"
                    for r in rules), ""]
    return lines


def summary(fit: ContentionFit, profile: ConcurrencyProfile) -> list[str]:
    lines = [f"- {r.value}: loss {fit.losses[r]:.4g}, memory {fit.rates[r].memory_bytes_per_s / 1e9:.4g} GB/s, "
             f"matmul {fit.rates[r].flops_per_s / 1e12:.4g} TFLOP/s" for r in ContentionRule]
    lines.append(f"- picked: **{fit.rule.value}** (the file says {profile.rule.value})")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", type=Path, nargs="+", help="concurrency.yaml written by prism profile --pair-with")
    args = p.parse_args()
    print("\n".join(report(path) for path in args.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
