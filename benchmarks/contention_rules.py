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
import dataclasses
import sys
from pathlib import Path

from prism.sched.concurrency import ContentionRule
from prism.sched.concurrency_profile import (ConcurrencyProfile, ContentionFit, fit_contention, fit_pace,
                                             pace_accounts, predicted_turn)
from prism.sim.costs import card_defaults


def with_layers(profile: ConcurrencyProfile) -> ConcurrencyProfile:
    """The profile with its relaunched steps' layer counts from the model catalog where the file
    has none (files measured before `prism profile` recorded them); unknown models keep none."""
    from prism.config import ConfigError, ModelSpec
    from prism.sim.shapes import model_shape

    def filled(step):
        try:
            layers = step.num_layers or model_shape(ModelSpec(step.model, step.model), profile.device).num_layers
        except ConfigError:
            return step
        return dataclasses.replace(step, num_layers=layers)

    return dataclasses.replace(profile, streams=tuple(dataclasses.replace(m, steps=tuple(map(filled, m.steps)))
                                                      for m in profile.streams))


def report(path: Path) -> str:
    profile = with_layers(ConcurrencyProfile.load(path))
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
    pace = fit_pace(profile.streams, fit)
    accounts = pace_accounts(fit, pace)
    lines = ["Steps relaunched at their own pace: each one's period (ms) alone, side by side, and as predicted",
             "", "| case | step | alone | measured | " + " | ".join(accounts) + " |",
             "|---|---|---:|---:|" + "---:|" * len(accounts)]
    for m in profile.streams:
        predicted = [periods(m.steps) for periods in accounts.values()]
        for i, step in enumerate(m.steps):
            lines.append(f"| {m.case.replace('|', '/') if i == 0 else ''} | {step.model} | {step.alone_s * 1e3:.2f} | "
                         f"{m.side_s[i] * 1e3:.2f} | "
                         + " | ".join(f"{p[i] * 1e3:.2f} ({p[i] / m.side_s[i] - 1:+.0%})" for p in predicted) + " |")
    lines += ["", *(f"- {name}: loss over the periods {loss:.4g}" for name, loss in pace.losses.items()),
              f"- at their own pace: **{dataclasses.replace(profile, interleave=pace.interleave).pace_account}**", ""]
    return lines


def refit(path: Path, out: Path) -> Path:
    """The file fitted again from its own measurements, layer counts filled in (`with_layers`)."""
    p = with_layers(ConcurrencyProfile.load(path))
    again = ConcurrencyProfile.fitted(p.turns, card_defaults(p.device), p.card, p.device, p.date,
                                      p.command + " (refitted: benchmarks/contention_rules.py --refit)", p.streams)
    return again.save(out)


def summary(fit: ContentionFit, profile: ConcurrencyProfile) -> list[str]:
    lines = [f"- {r.value}: loss {fit.losses[r]:.4g}, memory {fit.rates[r].memory_bytes_per_s / 1e9:.4g} GB/s, "
             f"matmul {fit.rates[r].flops_per_s / 1e12:.4g} TFLOP/s" for r in ContentionRule]
    lines.append(f"- picked: **{fit.rule.value}** (the file says {profile.rule.value})")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", type=Path, nargs="+", help="concurrency.yaml written by prism profile --pair-with")
    p.add_argument("--refit", type=Path, default=None, metavar="DIR",
                   help="write each file fitted again (layer counts filled in, own pace fitted) into DIR")
    args = p.parse_args()
    print("\n".join(report(path) for path in args.files))
    for path in args.files if args.refit else ():
        print(f"wrote {refit(path, args.refit / path.name)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
