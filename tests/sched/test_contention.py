"""The contention rule of steps side by side (prism.sched.concurrency): one budget of binding
floors, or a budget per resource (bandwidth, matmul); its arithmetic in a turn and on a shared
chip, the fit that lets measured turns pick it, and its place in concurrency.yaml."""
import dataclasses

import pytest
import yaml

from prism.errors import UserError
from prism.sched.concurrency import ConcurrentTurn, ContentionRule, SharedChip, StepFloor, step_floor, step_floors
from prism.sched.concurrency_profile import (CONCURRENCY_FILE, ConcurrencyProfile, MeasuredStreams, MeasuredTurn,
                                             SideStep, fit_contention, predicted_streams, predicted_turn,
                                             streams_loss)
from prism.sched.cost import DefaultCosts

ONE, PER = ContentionRule.ONE_BUDGET, ContentionRule.PER_RESOURCE
RATES = DefaultCosts(memory_bytes_per_s=1e12, flops_per_s=1e14)
ONE_B = 2_000_000_000  # a 1B model's 16-bit weights

# A decode of one token: 2 ms of weights to read, 20 us of matmuls; 2.5 ms alone.
DECODE_FLOOR, DECODE_S = StepFloor(moved=2e-3, computed=2e-5), 2.5e-3
# A 2,000-token prompt chunk of the same model: 2 ms to read, 40 ms of matmuls; 41 ms alone.
PREFILL_FLOOR, PREFILL_S = StepFloor(moved=2e-3, computed=4e-2), 41e-3


def test_a_steps_floor_is_its_bytes_over_bandwidth_and_its_flops_over_the_matmul_rate():
    assert step_floors(RATES, ONE_B, 0, 0, 1) == pytest.approx(DECODE_FLOOR)
    assert step_floors(RATES, ONE_B, 0, 0, 2000) == pytest.approx(PREFILL_FLOOR)
    kv = step_floors(RATES, ONE_B, 32 << 10, 16 * 1024, 16)  # 16 decodes of 1,024 tokens each
    assert kv.moved == pytest.approx((ONE_B + (32 << 10) * 16 * 1024) / 1e12)
    assert step_floor(RATES, ONE_B, 0, 0, 2000) == PREFILL_FLOOR.binding == 4e-2


# ---- a turn ------------------------------------------------------------------------------------
def turn_of(rule: ContentionRule, *steps: tuple[float, StepFloor | float]) -> float:
    turn = ConcurrentTurn(RATES, rule=rule)
    moved = [turn.charge(seconds, floor) for seconds, floor in steps]
    assert sum(moved) == pytest.approx(turn.charged)
    return turn.charged


def test_one_budget_charges_a_decode_beside_a_prefill_the_sum_of_their_binding_floors():
    assert turn_of(ONE, (DECODE_S, DECODE_FLOOR), (PREFILL_S, PREFILL_FLOOR)) == pytest.approx(2e-3 + 4e-2)


def test_per_resource_charges_a_decode_beside_a_prefill_the_longer_step_alone():
    # bandwidth: 2 ms + 2 ms, matmul: 0.02 ms + 40 ms; both below the prefill's 41 ms alone
    assert turn_of(PER, (DECODE_S, DECODE_FLOOR), (PREFILL_S, PREFILL_FLOOR)) == pytest.approx(PREFILL_S)


def test_per_resource_still_adds_up_steps_bound_by_the_same_resource():
    decodes = [(DECODE_S, DECODE_FLOOR)] * 3  # 3 x 2 ms of reads > 2.5 ms
    prefills = [(PREFILL_S, PREFILL_FLOOR)] * 2  # 2 x 40 ms of matmuls > 41 ms
    for rule in ContentionRule:
        assert turn_of(rule, *decodes) == pytest.approx(6e-3)
        assert turn_of(rule, *prefills) == pytest.approx(8e-2)


def test_each_part_of_a_floor_counts_at_most_the_steps_own_time():
    slow = StepFloor(moved=5e-3, computed=7e-3)  # rates below the card's: more than the 4 ms alone
    assert turn_of(PER, (4e-3, slow), (4e-3, slow)) == pytest.approx(8e-3)
    assert turn_of(ONE, (4e-3, slow), (4e-3, slow)) == pytest.approx(8e-3)


def test_a_bare_floor_counts_against_every_budget():
    """A floor given as one number (its split unknown) contends as under one budget."""
    for rule in ContentionRule:
        assert turn_of(rule, (DECODE_S, 2e-3), (PREFILL_S, 4e-2)) == pytest.approx(4.2e-2)


# ---- a shared chip -----------------------------------------------------------------------------
def test_per_resource_a_decode_and_a_prefill_share_the_chip_as_if_alone():
    chip = SharedChip(RATES, rule=PER)
    decode, prefill = chip.launch(0.0, 0.0, DECODE_S, DECODE_FLOOR), chip.launch(0.0, 0.0, PREFILL_S, PREFILL_FLOOR)
    assert decode.uses == pytest.approx((0.8, 0.008))
    assert prefill.uses == pytest.approx((2 / 41, 40 / 41))
    # bandwidth 0.8 + 0.049, matmul 0.008 + 0.976: neither budget is over
    assert (decode.done, prefill.done) == (pytest.approx(DECODE_S), pytest.approx(PREFILL_S))


def test_one_budget_a_decode_and_a_prefill_slow_each_other_by_their_summed_uses():
    chip = SharedChip(RATES, rule=ONE)
    decode, prefill = chip.launch(0.0, 0.0, DECODE_S, DECODE_FLOOR), chip.launch(0.0, 0.0, PREFILL_S, PREFILL_FLOOR)
    assert decode.uses == pytest.approx((0.8,)) and prefill.uses == pytest.approx((40 / 41,))
    slowdown = 0.8 + 40 / 41
    assert decode.done == pytest.approx(DECODE_S * slowdown)
    # the prefill ran 2.5 ms of its work beside the decode, the rest alone
    assert prefill.done == pytest.approx(DECODE_S * slowdown + PREFILL_S - DECODE_S)


def test_per_resource_two_prefills_are_slowed_by_their_matmul_uses():
    chip = SharedChip(RATES, rule=PER)
    a = chip.launch(0.0, 0.0, PREFILL_S, PREFILL_FLOOR)
    b = chip.launch(0.010, 0.0, PREFILL_S, PREFILL_FLOOR)
    slowdown = 2 * 40 / 41  # matmul; the bandwidth uses add up to only 4 / 41
    # a: 10 ms alone, then both slowed until a ends, b's rest alone
    a_done = 0.010 + (PREFILL_S - 0.010) * slowdown
    assert a.done == pytest.approx(a_done)
    assert b.done == pytest.approx(a_done + 0.010)


# ---- the fit picks the rule --------------------------------------------------------------------
H100 = DefaultCosts.nvidia_h100()
TRUE = dataclasses.replace(H100, memory_bytes_per_s=3.2e12, flops_per_s=450e12)  # what the synthetic card does
W8B, KV8B, W1B, KV1B = 16 << 30, 128 << 10, 5 << 29, 32 << 10


def decode(weight_bytes: int, kv: int, batch: int, context: int, slack: float = 1.4) -> SideStep:
    """A decode batch whose time alone is `slack` times its floor at the true rates."""
    return SideStep("m", slack * step_floor(TRUE, weight_bytes, kv, batch * context, batch),
                    weight_bytes, kv, batch * context, batch)


def prefill(weight_bytes: int, tokens: int, slack: float = 1.2) -> SideStep:
    return SideStep("m", slack * step_floor(TRUE, weight_bytes, 0, 0, tokens), weight_bytes, 0, 0, tokens)


CASES = [(decode(W8B, KV8B, 16, 1024), decode(W8B, KV8B, 16, 1024)),
         (decode(W1B, KV1B, 64, 1024), decode(W8B, KV8B, 64, 4096)),
         (prefill(W8B, 2048), prefill(W8B, 2048)),
         (prefill(W8B, 2048), prefill(W1B, 4096)),
         (prefill(W8B, 256), decode(W8B, KV8B, 16, 1024)),
         (decode(W8B, KV8B, 64, 1024), prefill(W8B, 512)),
         (prefill(W1B, 2048), decode(W8B, KV8B, 16, 4096))]


def turns_under(rule: ContentionRule, noise=()) -> list[MeasuredTurn]:
    noise = list(noise) or [1.0] * len(CASES)
    return [MeasuredTurn(f"case {i}", steps, predicted_turn(TRUE, steps, rule) * n)
            for i, (steps, n) in enumerate(zip(CASES, noise))]


def test_the_cases_tell_the_rules_apart():
    """A precondition of the fit tests: a decode beside a prefill costs less per resource."""
    one, per = turns_under(ONE), turns_under(PER)
    assert all(p.turn_s <= o.turn_s for o, p in zip(one, per))
    assert sum(p.turn_s < o.turn_s * 0.9 for o, p in zip(one, per)) >= 2


@pytest.mark.parametrize("rule", list(ContentionRule))
@pytest.mark.parametrize("noise", [(), (1.02, 0.98, 1.01, 0.99, 1.02, 0.985, 1.01)])
def test_the_fit_picks_the_rule_the_turns_were_made_under_and_its_rates(rule, noise):
    fit = fit_contention(turns_under(rule, noise), H100)
    assert fit.rule is rule
    other = PER if rule is ONE else ONE
    assert fit.losses[other] > 10 * fit.losses[rule] + 1e-3  # decisively
    tolerance = 0.04 if noise else 0.01
    assert fit.rates[rule].memory_bytes_per_s == pytest.approx(TRUE.memory_bytes_per_s, rel=tolerance)
    assert fit.rates[rule].flops_per_s == pytest.approx(TRUE.flops_per_s, rel=tolerance)


def test_turns_that_cannot_tell_the_rules_apart_keep_one_budget():
    """Decodes only: every step is bound by bandwidth, so both rules charge the same."""
    fit = fit_contention(turns_under(PER)[:2], H100)
    assert fit.losses[ONE] == pytest.approx(fit.losses[PER], abs=1e-12)
    assert fit.rule is ONE


# ---- steps relaunched at their own pace --------------------------------------------------------
def side_steps() -> tuple[SideStep, SideStep]:
    """A 1B decode of one sequence and a 2,000-token prompt of the same model, as measured steps
    whose floors at RATES are DECODE_FLOOR-like and PREFILL_FLOOR-like."""
    decode = SideStep("1b", DECODE_S, ONE_B, 0, 0, 1)
    prefill = SideStep("1b", PREFILL_S, ONE_B, 0, 0, 2000)
    return decode, prefill


def test_relaunched_side_by_side_one_budget_slows_the_prefill_by_the_stream_of_decodes():
    decode, prefill = side_steps()
    floors = [step_floors(RATES, s.weight_bytes, 0, 0, s.num_tokens) for s in (decode, prefill)]
    use = [f.binding / s.alone_s for f, s in zip(floors, (decode, prefill))]
    periods = predicted_streams(RATES, (decode, prefill), ONE)
    # both always on the chip: each slowed by the summed uses
    assert periods == pytest.approx(tuple(s.alone_s * sum(use) for s in (decode, prefill)), rel=0.02)
    # per resource the decode's bandwidth and the prefill's matmuls overlap: each as alone
    assert predicted_streams(RATES, (decode, prefill), PER) == pytest.approx((DECODE_S, PREFILL_S), rel=0.02)


def test_a_stream_alone_keeps_its_period_and_the_loss_is_zero_where_predicted():
    decode, prefill = side_steps()
    assert predicted_streams(RATES, (decode,), ONE) == pytest.approx((DECODE_S,))
    exact = MeasuredStreams("d | p", (decode, prefill), predicted_streams(RATES, (decode, prefill), ONE))
    assert streams_loss(RATES, [exact], ONE) == pytest.approx(0.0, abs=1e-12)
    assert streams_loss(RATES, [exact], PER) > 0.01


# ---- the file ------------------------------------------------------------------------------------
def test_the_rule_and_both_losses_go_through_the_file(tmp_path):
    profile = ConcurrencyProfile.fitted(turns_under(PER), H100, "H100", "cuda:0", "2026-12-06", "prism profile")
    assert profile.rule is PER and set(profile.losses) == {ONE, PER}
    path = profile.save(tmp_path / CONCURRENCY_FILE)
    raw = yaml.safe_load(path.read_text())
    assert raw["rule"] == "per-resource" and set(raw["loss"]) == {"one-budget", "per-resource"}
    again = ConcurrencyProfile.load(path)
    assert again.rule is PER
    assert again.losses[ONE] == pytest.approx(profile.losses[ONE], rel=1e-6)
    assert again.to_dict() == profile.to_dict() and again.streams == () and "streams" not in raw


def layered(steps, layers):
    return tuple(dataclasses.replace(s, num_layers=n) for s, n in zip(steps, layers))


def test_periods_made_by_interleaving_pick_it_and_its_wait():
    from prism.sched.concurrency_profile import INTERLEAVED, fit_pace

    cases = [layered(side_steps(), (16, 16)), layered(side_steps(), (16, 32)),
             layered((side_steps()[0], side_steps()[0]), (16, 32))]
    streams = [MeasuredStreams(f"case {i}", steps, predicted_streams(RATES, steps, ONE, interleave=0.37))
               for i, steps in enumerate(cases)]
    fit = fit_contention(turns_under(ONE), H100)
    pace = fit_pace(streams, fit)
    assert pace.wait == pytest.approx(0.37) and pace.interleave == pace.wait
    assert pace.losses[INTERLEAVED] < 1e-9 < min(pace.losses[r.value] for r in ContentionRule)
    # without layer counts there is no interleaving to fit: the fluid rule stays
    bare = [MeasuredStreams(m.case, side_steps(), m.side_s) for m in streams]
    assert fit_pace(bare, fit).wait is None and fit_pace(bare, fit).interleave is None
    # periods the fluid rule made keep it
    fluid = [MeasuredStreams(m.case, m.steps, predicted_streams(fit.rates[ONE], m.steps, ONE)) for m in streams]
    assert fit_pace(fluid, fit).interleave is None


def test_measured_streams_go_through_the_file(tmp_path):
    streams = (MeasuredStreams("decode 1 | prefill 2000", side_steps(), (4.1e-3, 60e-3)),)
    profile = ConcurrencyProfile.fitted(turns_under(ONE), H100, "H100", "cuda:0", "-", "-", streams)
    (again,) = ConcurrencyProfile.load(profile.save(tmp_path / CONCURRENCY_FILE)).streams
    assert (again.case, again.steps) == (streams[0].case, streams[0].steps)
    assert again.side_s == pytest.approx(streams[0].side_s)
    steps = layered(side_steps(), (16, 16))
    made = (MeasuredStreams("interleaved", steps, predicted_streams(RATES, steps, ONE, interleave=0.5)),)
    profile = ConcurrencyProfile.fitted(turns_under(ONE), H100, "H100", "cuda:0", "-", "-", made)
    again = ConcurrencyProfile.load(profile.save(tmp_path / "again.yaml"))
    assert again.interleave == pytest.approx(0.5) and again.streams[0].steps == steps
    assert set(again.pace_losses) == {"one-budget", "per-resource", "interleaved"}
    assert again.pace_account == "interleaved, wait 0.5"


def test_a_file_without_a_rule_is_one_budget(tmp_path):
    """Files written before the rule was fitted load unchanged."""
    raw = ConcurrencyProfile.fitted(turns_under(PER), H100, "H100", "cuda:0", "-", "-").to_dict()
    del raw["rule"], raw["loss"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(raw))
    old = ConcurrencyProfile.load(tmp_path / "old.yaml")
    assert old.rule is ONE and old.losses == {}
    assert old.memory_bytes_per_s == pytest.approx(raw["memory_gb_per_s"] * 1e9)
    assert "loss" not in old.to_dict()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(dict(raw, rule="two-budgets")))
    with pytest.raises(UserError, match="not a concurrency profile"):
        ConcurrencyProfile.load(tmp_path / "bad.yaml")
