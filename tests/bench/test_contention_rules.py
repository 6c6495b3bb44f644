"""benchmarks/contention_rules.py on concurrency.yaml files of turns made under each rule: the
table charges every turn under both rules, and the rule the turns were made under fits them."""
import sys
from pathlib import Path

import pytest

from prism.sched.concurrency import ContentionRule

from prism.sched.concurrency_profile import CONCURRENCY_FILE, ConcurrencyProfile, MeasuredTurn, predicted_turn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "sched"))

import contention_rules  # noqa: E402
from test_contention import CASES, H100, TRUE  # noqa: E402


@pytest.mark.parametrize("rule", list(ContentionRule))
def test_the_table_shows_each_turn_under_both_rules_and_picks_the_one_they_were_made_under(rule, tmp_path):
    turns = [MeasuredTurn(f"case {i} | x", steps, predicted_turn(TRUE, steps, rule)) for i, steps in enumerate(CASES)]
    # the file's own fit at the nominal rates under one budget: the script fits again
    path = ConcurrencyProfile("H100", "cuda:0", "-", "prism profile", H100.memory_bytes_per_s, H100.flops_per_s,
                              tuple(turns)).save(tmp_path / CONCURRENCY_FILE)
    table = contention_rules.report(path)
    print(table)
    rows = [line for line in table.splitlines() if line.startswith("| case ") and " / x |" in line]
    assert len(rows) == len(CASES)
    assert all(line.count("|") == 6 for line in rows)  # the case's own "|" does not split it
    errors = {r: [error(line, 4 + i) for line in rows] for i, r in enumerate(ContentionRule)}
    other = next(r for r in ContentionRule if r is not rule)
    assert max(map(abs, errors[rule])) < 0.01  # within the fit's grid of rates
    assert max(map(abs, errors[other])) > 0.03
    assert f"picked: **{rule.value}** (the file says one-budget)" in table


def error(row: str, column: int) -> float:
    """The relative error in a cell "12.34 (+5.6%)"."""
    return float(row.split("|")[column].split("(")[1].rstrip("%) ")) / 100


def test_streams_relaunched_at_their_own_pace_get_a_table_of_their_own(tmp_path):
    """Periods made under one budget at the fitted rates: that rule's column is exact."""
    from prism.sched.concurrency_profile import MeasuredStreams, fit_contention, predicted_streams

    turns = [MeasuredTurn(f"case {i} | x", steps, predicted_turn(TRUE, steps, ContentionRule.ONE_BUDGET))
             for i, steps in enumerate(CASES)]
    rates = fit_contention(turns, H100).rates[ContentionRule.ONE_BUDGET]
    streams = tuple(MeasuredStreams(f"case {i} | x", steps, predicted_streams(rates, steps))
                    for i, steps in enumerate(CASES))
    path = ConcurrencyProfile("H100", "cuda:0", "-", "prism profile", H100.memory_bytes_per_s, H100.flops_per_s,
                              tuple(turns), streams=streams).save(tmp_path / CONCURRENCY_FILE)
    table = contention_rules.report(path)
    rows = [line for line in table.splitlines() if line.count("|") == 7 and "ms" not in line and "---" not in line]
    rows = rows[1:]  # the header
    assert len(rows) == sum(len(steps) for steps in CASES)
    assert all(abs(error(line, 5)) < 0.005 for line in rows)  # one budget, as made
    losses = {line.split(":")[0][2:]: float(line.rsplit(" ", 1)[1]) for line in table.splitlines()
              if "loss over the periods" in line}
    assert losses["one-budget"] < 1e-6 < losses["per-resource"]
