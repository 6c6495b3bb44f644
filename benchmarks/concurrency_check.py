"""Held-out check of the rates `prism profile --pair-with` fits: the turns of one pair's file
charged at the rates and under the contention rule fitted to another pair's (and at the nominal
rates under that rule, and at its own fit).

    python3 benchmarks/concurrency_check.py FITTED.yaml HELD_OUT.yaml

e.g. FITTED from llama-3.2-1b + llama-3.1-8b, HELD_OUT from llama-3.1-8b twice.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prism.cli.profile import print_turn_table
from prism.sched.concurrency_profile import ConcurrencyProfile
from prism.sim.costs import card_defaults


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fitted", type=Path, help="concurrency.yaml whose rates are checked")
    p.add_argument("held_out", type=Path, help="concurrency.yaml of other measured turns")
    args = p.parse_args()
    fitted, held_out = ConcurrencyProfile.load(args.fitted), ConcurrencyProfile.load(args.held_out)
    nominal = card_defaults(held_out.device)
    print(f"turns of {held_out.command!r} ({held_out.card}, {held_out.date})\n"
          f"at the rates of {fitted.command!r} ({fitted.card}, {fitted.date})")
    print_turn_table(held_out.turns, {"nominal": (nominal, fitted.rule),
                                      "own fit": (held_out.rates(nominal), held_out.rule),
                                      "other fit": (fitted.rates(nominal), fitted.rule)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
