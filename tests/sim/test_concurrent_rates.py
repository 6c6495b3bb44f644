"""The rates steps side by side are charged at: fitted to measured turns (prism.sched.concurrency),
kept as concurrency.yaml in a profile folder, and picked up by the simulator from there."""
import dataclasses
import shutil
import statistics
from pathlib import Path

import pytest

from prism.bench.trace import TraceRequest
from prism.errors import UserError
from prism.sched.concurrency import ContentionRule, step_floor
from prism.sched.concurrency_profile import (CONCURRENCY_FILE, ConcurrencyProfile, MeasuredTurn, SideStep, fit_rates,
                                             predicted_turn)
from prism.sched.cost import DefaultCosts
from prism.sim.costs import ProfileSet, card_defaults, step_seconds
from prism.sim.device import SimDevice
from prism.sim.run import config_for, simulate
from prism.sim.shapes import model_shape

from linear_cost import LinearCost
from test_concurrent_models import MODELS, concurrent, two_models_decoding
from test_device_agrees_with_worker import config

H100 = DefaultCosts.nvidia_h100()
TRUE = dataclasses.replace(H100, memory_bytes_per_s=3.2e12, flops_per_s=450e12)  # what the synthetic card does
W8B, KV8B, W1B, KV1B = 16 << 30, 128 << 10, 5 << 29, 32 << 10


def decode(weight_bytes, kv, batch, context, slack=1.4):
    """A decode step whose time alone is `slack` times its floor at the true rates."""
    floor = step_floor(TRUE, weight_bytes, kv, batch * context, batch)
    return SideStep("m", slack * floor, weight_bytes, kv, batch * context, batch)


def prefill(weight_bytes, tokens, slack=1.2):
    return SideStep("m", slack * step_floor(TRUE, weight_bytes, 0, 0, tokens), weight_bytes, 0, 0, tokens)


def turns_at(rates, steps_of_cases, noise=()):
    noise = list(noise) or [1.0] * len(steps_of_cases)
    return [MeasuredTurn(f"case {i}", steps, predicted_turn(rates, steps) * n)
            for i, (steps, n) in enumerate(zip(steps_of_cases, noise))]


DECODES = [(decode(W8B, KV8B, 1, 1024), decode(W8B, KV8B, 1, 1024)),
           (decode(W8B, KV8B, 16, 1024), decode(W1B, KV1B, 16, 1024)),
           (decode(W1B, KV1B, 64, 1024), decode(W8B, KV8B, 64, 4096))]
PREFILLS = [(prefill(W8B, 2048), prefill(W8B, 2048)), (prefill(W8B, 2048), prefill(W1B, 4096)),
            (prefill(W8B, 256), decode(W1B, KV1B, 16, 1024))]


def test_the_fit_finds_the_rates_the_turns_were_made_with():
    fitted = fit_rates(turns_at(TRUE, DECODES + PREFILLS), H100)
    assert fitted.memory_bytes_per_s == pytest.approx(TRUE.memory_bytes_per_s, rel=0.01)
    assert fitted.flops_per_s == pytest.approx(TRUE.flops_per_s, rel=0.01)
    assert fitted.h2d_bytes_per_s == H100.h2d_bytes_per_s


def test_the_fit_tolerates_noise():
    noise = [1.02, 0.98, 1.01, 0.99, 1.02, 0.985]
    fitted = fit_rates(turns_at(TRUE, DECODES + PREFILLS, noise), H100)
    assert fitted.memory_bytes_per_s == pytest.approx(TRUE.memory_bytes_per_s, rel=0.04)
    assert fitted.flops_per_s == pytest.approx(TRUE.flops_per_s, rel=0.04)


def test_a_rate_no_turn_is_bound_by_stays_nominal():
    """Decodes say nothing of the matmul rate; turns that took their longest step (fully
    overlapped) say only that the rates are at least so high: the least departure from the
    nominal rates that fits them is taken, the nominal rates themselves where they fit."""
    only_decodes = fit_rates(turns_at(TRUE, DECODES), H100)
    assert only_decodes.memory_bytes_per_s == pytest.approx(TRUE.memory_bytes_per_s, rel=0.01)
    assert only_decodes.flops_per_s == H100.flops_per_s
    overlapped = [MeasuredTurn("x", steps, max(s.alone_s for s in steps)) for steps in DECODES]
    fitted = fit_rates(overlapped, H100)
    assert all(predicted_turn(fitted, t.steps) == pytest.approx(t.turn_s, rel=1e-9) for t in overlapped)
    assert fitted.flops_per_s == H100.flops_per_s
    lower = dataclasses.replace(fitted, memory_bytes_per_s=fitted.memory_bytes_per_s * 0.98)
    assert any(predicted_turn(lower, t.steps) > t.turn_s * 1.001 for t in overlapped)  # the least that fits
    loose = [tuple(dataclasses.replace(s, alone_s=4 * s.alone_s) for s in steps) for steps in DECODES]
    assert fit_rates([MeasuredTurn("x", steps, max(s.alone_s for s in steps)) for steps in loose], H100) == H100


def test_steps_that_ran_one_after_another_fit_rates_that_say_so():
    """On a CPU a turn is its steps in a row: the fitted rates charge every turn its sum."""
    serial = [MeasuredTurn("x", steps, sum(s.alone_s for s in steps)) for steps in DECODES + PREFILLS]
    fitted = fit_rates(serial, H100)
    for turn in serial:
        assert predicted_turn(fitted, turn.steps) == pytest.approx(turn.turn_s, rel=1e-6)


def test_a_profile_goes_through_its_file(tmp_path):
    profile = ConcurrencyProfile.fitted(turns_at(TRUE, DECODES + PREFILLS), H100, "H200", "cuda:0", "2026-12-05",
                                        "prism profile --model a --pair-with b")
    path = profile.save(tmp_path / CONCURRENCY_FILE)
    again = ConcurrencyProfile.load(path)
    assert again.to_dict() == profile.to_dict()
    assert again.memory_bytes_per_s == pytest.approx(profile.memory_bytes_per_s, rel=1e-9)
    assert [t.case for t in again.turns] == [t.case for t in profile.turns]
    assert again.rates(H100) == dataclasses.replace(H100, memory_bytes_per_s=again.memory_bytes_per_s,
                                                    flops_per_s=again.flops_per_s)
    (tmp_path / "bad.yaml").write_text("card: x\nmemory_gb_per_s: fast\n")
    with pytest.raises(UserError, match="not a concurrency profile"):
        ConcurrencyProfile.load(tmp_path / "bad.yaml")


def test_the_simulated_device_charges_turns_at_the_rates_it_is_given():
    """The same turn as in test_concurrent_models, at an eighth of the nominal rates: the
    floors (each at most its step's time) now outweigh the longest step."""
    cost, cfg = LinearCost(), concurrent(config("prism"), 2)
    shapes = {m.name: model_shape(m, "cpu") for m in cfg.models}
    nominal = card_defaults("cpu")
    slow = dataclasses.replace(nominal, memory_bytes_per_s=nominal.memory_bytes_per_s / 8,
                               flops_per_s=nominal.flops_per_s / 8)
    turn_times = {}
    for name, rates in (("nominal", None), ("slow", slow)):
        sim = SimDevice(cfg, shapes, truth=cost, policy_profiles={}, policy_cost=cost, concurrent_rates=rates)
        two_models_decoding(sim)
        sim.step()  # both prefills
        before = sim.clock.now()
        sim.step()
        plans = {m: sim.engines[m].last_plan for m in MODELS}
        alone = [step_seconds(cost, m, *p.cost_terms()) for m, p in plans.items()]
        floors = [min(t, step_floor(rates or nominal, shapes[m].weight_bytes, shapes[m].kv_bytes_per_token,
                                    p.cost_terms()[1], p.num_tokens)) for t, (m, p) in zip(alone, plans.items())]
        turn_times[name] = sim.clock.now() - before
        assert turn_times[name] == pytest.approx(max(max(alone), sum(floors)))
    assert turn_times["slow"] > turn_times["nominal"]


# ---- the simulator picks the file up from the profile folder ------------------------------------
RAW = {"devices": [{"device": "cuda:0", "memory": "40GiB"}],
       "models": [{"name": "a", "source": "llama-3.2-1b:random"}, {"name": "b", "source": "llama-3.2-1b:random:1"}],
       "scheduler": {"concurrent_models": 2}}
BOTH_DECODING = [TraceRequest(0.0, m, 64, 200) for m in ("a", "b") for _ in range(4)]


def median_tpot(folder: Path | None) -> float:
    records = simulate(config_for(RAW, "prism"), BOTH_DECODING, ProfileSet.load(folder)).records
    return statistics.median(r.tpot for r in records)


def write_rates(folder: Path, device: str, factor: float, rule: ContentionRule = ContentionRule.ONE_BUDGET) -> Path:
    folder.mkdir(exist_ok=True)
    nominal = card_defaults(device)
    ConcurrencyProfile("test", device, "-", "-", nominal.memory_bytes_per_s * factor,
                       nominal.flops_per_s * factor, rule=rule).save(folder / CONCURRENCY_FILE)
    return folder


def test_a_concurrent_micro_trace_takes_the_rates_of_the_profile_folder(tmp_path):
    """Two 1B models decoding together at roofline step times: at the nominal rates their
    floors are their whole steps (a turn is both in a row); at twice the rates a turn is the
    longer step alone. Rates measured on another kind of device do not apply."""
    empty = tmp_path / "empty"
    empty.mkdir()
    without = median_tpot(empty)
    assert ProfileSet.load(empty).concurrency is None
    assert median_tpot(write_rates(tmp_path / "nominal", "cuda:0", 1.0)) == without
    assert median_tpot(write_rates(tmp_path / "cpu", "cpu", 2.0)) == without
    twice = write_rates(tmp_path / "twice", "cuda:0", 2.0)
    assert ProfileSet.load(twice).concurrent_rates("cuda:3").memory_bytes_per_s == 2 * H100.memory_bytes_per_s
    assert median_tpot(twice) / without == pytest.approx(0.5, rel=0.05)


def test_turns_take_the_contention_rule_of_the_profile_folder(tmp_path):
    """Model a decodes while b prefills long prompts: per resource a turn of a's decode and
    b's prompt chunk is nearer the longer step alone than the sum of their floors. Rules
    measured on another kind of device do not apply."""
    trace = sorted([TraceRequest(0.0, "a", 64, 200)] + [TraceRequest(0.05 * i, "b", 4000, 2) for i in range(8)],
                   key=lambda t: t.arrival_s)

    def a_tpot(folder: Path) -> float:
        records = simulate(config_for(RAW, "prism"), trace, ProfileSet.load(folder)).records
        return next(r.tpot for r in records if r.model == "a")

    per = write_rates(tmp_path / "per", "cuda:0", 1.0, ContentionRule.PER_RESOURCE)
    assert ProfileSet.load(per).contention_rule("cuda:1") is ContentionRule.PER_RESOURCE
    assert ProfileSet.load(per).contention_rule("cpu") is ContentionRule.ONE_BUDGET
    one = a_tpot(write_rates(tmp_path / "one", "cuda:0", 1.0))
    assert a_tpot(write_rates(tmp_path / "cpu", "cpu", 1.0, ContentionRule.PER_RESOURCE)) == one
    per_tpot = a_tpot(per)
    print(f"\na's TPOT beside b's prompts in turns: one budget {one * 1e3:.2f} ms, per resource {per_tpot * 1e3:.2f} ms")
    assert per_tpot < one


def test_measured_profiles_and_the_concurrency_file_load_side_by_side(tmp_path):
    """The file is no profile JSON: the folder's profiles load as before."""
    src = Path(__file__).resolve().parents[2] / "benchmarks" / "profiles" / "nvidia-h200"
    for path in src.glob("*.json"):
        shutil.copy(path, tmp_path)
    before = ProfileSet.load(tmp_path).measured
    write_rates(tmp_path, "cuda:0", 0.9)
    after = ProfileSet.load(tmp_path)
    assert after.measured == before and after.concurrency is not None
