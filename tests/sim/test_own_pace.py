"""Models that step at their own pace on one device (LocalSchedulerConfig.pace "own"): each
model steps again as soon as its own last step is done, as separate engines under MPS do, the
chip shared step by step (SharedChip); under "turn" a small model's decode waits for the big
model's step. The static and muxserve baselines run this way by default (docs/policies.md)."""
import statistics

import pytest

from prism.bench.trace import TraceRequest
from prism.cluster.config import parse_config
from prism.cluster.systems import system_config
from prism.sched.concurrency import ConcurrentTurn, ContentionRule, SharedChip
from prism.sched.concurrency_profile import CONCURRENCY_FILE, ConcurrencyProfile
from prism.sched.local import Pace
from prism.sim.costs import ProfileSet, card_defaults
from prism.sim.run import config_for, simulate

ROOFLINE = ProfileSet({}, {})  # H100 nominal rates
RATES = card_defaults("cuda:0")
BIG = {"name": "big", "source": "llama-3.1-8b:random", "rate": 1}
SMALL = {"name": "small", "source": "llama-3.2-1b:random", "rate": 1}
SMALL_OUT = 200


# ---- the contention rule's arithmetic -----------------------------------------------------------
def test_a_step_alone_takes_its_host_time_then_its_device_time():
    chip = SharedChip(RATES)
    step = chip.launch(1.0, 0.001, 0.004, 0.002)
    assert step.done == pytest.approx(1.005)


def test_steps_that_together_ask_less_than_the_chip_run_as_fast_as_alone():
    chip = SharedChip(RATES)
    a = chip.launch(0.0, 0.0, 0.010, 0.006)  # uses 0.6 of the chip
    b = chip.launch(0.002, 0.0, 0.004, 0.0016)  # 0.4: together 1.0
    assert (a.done, b.done) == (pytest.approx(0.010), pytest.approx(0.006))


def test_beyond_the_chip_every_running_step_is_slowed_by_the_sum_of_their_uses():
    chip = SharedChip(RATES)
    a = chip.launch(0.0, 0.0, 0.010, 0.009)  # use 0.9
    assert a.done == pytest.approx(0.010)
    b = chip.launch(0.002, 0.0, 0.002, 0.001)  # use 0.5: both at 1 / 1.4 of their speed
    # b: 2 ms of work at 1/1.4 -> ends at 0.002 + 2.8 ms; a did 2 ms alone, 2 ms of work in
    # b's 2.8 ms, then its last 6 ms alone again.
    assert b.done == pytest.approx(0.0048)
    assert a.done == pytest.approx(0.0108)  # pushed back by the later launch


def test_host_time_keeps_a_step_off_the_chip():
    chip = SharedChip(RATES)
    a = chip.launch(0.0, 0.005, 0.002, 0.002)  # on the chip only from 5 ms
    b = chip.launch(0.0, 0.0, 0.004, 0.004)  # alone until then
    assert (b.done, a.done) == (pytest.approx(0.004), pytest.approx(0.007))


def test_a_floor_above_the_steps_time_counts_as_its_time():
    chip = SharedChip(RATES)
    a = chip.launch(0.0, 0.0, 0.004, 0.040)
    b = chip.launch(0.0, 0.0, 0.004, 0.040)
    assert a.done == b.done == pytest.approx(0.008)  # each takes the whole chip: one after the other's worth


@pytest.mark.parametrize("steps", [((0.004, 0.003), (0.002, 0.0025)), ((0.010, 0.002), (0.003, 0.003)),
                                   ((0.006, 0.006), (0.006, 0.006), (0.001, 0.0002))])
def test_steps_launched_together_take_at_least_what_a_turn_charges(steps):
    chip, turn = SharedChip(RATES), ConcurrentTurn(RATES)
    done = [chip.launch(0.0, 0.0, alone, floor) for alone, floor in steps]
    for alone, floor in steps:
        turn.charge(alone, floor)
    assert max(s.done for s in done) >= turn.charged - 1e-12
    assert max(s.done for s in done) <= sum(alone for alone, _ in steps) + 1e-12  # never worse than in turn


# ---- the knob ------------------------------------------------------------------------------------
RAW = {"devices": [{"device": "cuda:0", "memory": "80GiB"}], "models": [BIG, SMALL]}


@pytest.mark.parametrize("system, pace", [("prism", "turn"), ("static", "own"), ("muxserve", "own"),
                                          ("swap", "turn"), ("serverless", "turn"), ("dedicated", "turn")])
def test_each_system_has_its_pace_and_a_config_may_set_any(system, pace):
    assert parse_config(system_config(RAW, system)).local.pace is Pace(pace)
    for given in ("turn", "own"):
        raw = dict(RAW, scheduler={"pace": given})
        assert parse_config(system_config(raw, system)).local.pace is Pace(given)


# ---- a two-model micro-trace ---------------------------------------------------------------------
def micro_trace() -> list[TraceRequest]:
    """The 8B model prefills 2,000-token prompts every 100 ms (long steps, then a growing decode
    batch) while the 1B model decodes one long request."""
    big = [TraceRequest(0.1 * i, "big", 2000, 100) for i in range(20)]
    return sorted(big + [TraceRequest(0.3, "small", 64, SMALL_OUT)], key=lambda t: t.arrival_s)


def run(trace, pace: str, models=(BIG, SMALL), profiles=ROOFLINE):
    raw = {"devices": RAW["devices"], "models": list(models), "scheduler": {"pace": pace}}
    records = simulate(config_for(raw, "static"), trace, profiles).records
    assert all(r.ok for r in records)
    return records


def small_gaps(records) -> list[float]:
    small = next(r for r in records if r.model == "small")
    assert len(small.token_s) == SMALL_OUT
    return [b - a for a, b in zip(small.token_s, small.token_s[1:])]


def test_a_small_models_decode_keeps_its_own_pace_beside_a_big_models_long_steps():
    trace = micro_trace()
    alone = statistics.median(small_gaps(run([r for r in trace if r.model == "small"], "own", (SMALL,))))
    own, turn = run(trace, "own"), run(trace, "turn")
    big_step = statistics.median(r.tpot for r in turn if r.model == "big")
    own_tpot, turn_tpot = statistics.mean(small_gaps(own)), statistics.mean(small_gaps(turn))
    print(f"\nsmall's step alone {alone * 1e3:.2f} ms; its TPOT beside big: own pace {own_tpot * 1e3:.2f} ms, "
          f"in turn {turn_tpot * 1e3:.2f} ms (big's TPOT {big_step * 1e3:.1f} ms)")
    assert turn_tpot > big_step / 2  # in turn it waits for big's steps
    assert own_tpot < 2.5 * alone < big_step / 2  # at its own pace only the shared chip slows it
    # Its tokens never come sooner than its step alone takes (read once done, never before).
    assert min(small_gaps(own)) >= alone * (1 - 1e-9)


def test_at_its_own_pace_the_big_model_is_not_starved():
    trace = micro_trace()
    own = {r.index: r for r in run(trace, "own")}
    alone = {r.index: r for r in run([r for r in trace if r.model == "big"], "own", (BIG,))}
    finish_own = max(r.finish_s for r in own.values() if r.model == "big")
    finish_alone = max(r.finish_s for r in alone.values())
    # small's decode shares the chip: big's last request is late by a share of it, not more
    assert finish_alone <= finish_own < finish_alone * 1.5


def nominal_rates_under(rule: ContentionRule, folder) -> ProfileSet:
    folder.mkdir()
    ConcurrencyProfile("test", "cuda:0", "-", "-", RATES.memory_bytes_per_s, RATES.flops_per_s,
                       rule=rule).save(folder / CONCURRENCY_FILE)
    return ProfileSet.load(folder)


def test_the_contention_rule_of_the_profile_folder_reaches_the_shared_chip(tmp_path):
    """Per resource, the small model's bandwidth-bound decode is slowed by the big model's
    prefills only through what it computes; under one budget, as before any rule was fitted."""
    trace = micro_trace()
    one = run(trace, "own", profiles=nominal_rates_under(ContentionRule.ONE_BUDGET, tmp_path / "one"))
    per = run(trace, "own", profiles=nominal_rates_under(ContentionRule.PER_RESOURCE, tmp_path / "per"))
    assert small_gaps(one) == small_gaps(run(trace, "own"))  # one budget: what no file charges
    one_tpot, per_tpot = statistics.mean(small_gaps(one)), statistics.mean(small_gaps(per))
    print(f"\nsmall's TPOT beside big at its own pace: one budget {one_tpot * 1e3:.2f} ms, "
          f"per resource {per_tpot * 1e3:.2f} ms")
    assert per_tpot < one_tpot


def test_interleaving_from_the_profile_folder_reaches_the_shared_chip(tmp_path):
    """Layers taking turns: the small model's many light decode steps wait behind the big
    model's heavy prefill layers, more than fluid sharing charges them."""
    folder = tmp_path / "interleaved"
    folder.mkdir()
    ConcurrencyProfile("test", "cuda:0", "-", "-", RATES.memory_bytes_per_s, RATES.flops_per_s,
                       interleave=0.6).save(folder / CONCURRENCY_FILE)
    profiles = ProfileSet.load(folder)
    assert profiles.interleave("cuda:1") == 0.6 and profiles.interleave("cpu") is None
    trace = micro_trace()
    fluid, interleaved = small_gaps(run(trace, "own")), small_gaps(run(trace, "own", profiles=profiles))
    print(f"\nsmall's TPOT beside big at its own pace: fluid {statistics.mean(fluid) * 1e3:.2f} ms, "
          f"interleaved {statistics.mean(interleaved) * 1e3:.2f} ms")
    assert statistics.mean(interleaved) > statistics.mean(fluid)


def test_interleaved_each_step_waits_a_share_of_the_others_layers_per_layer_of_its_own():
    chip = SharedChip(RATES, interleave=0.5)
    prefill = chip.launch(0.0, 0.0, 0.032, 0.03, layers=32)  # 1 ms a layer
    decode = chip.launch(0.0, 0.0, 0.0016, 0.001, layers=16)  # 0.1 ms a layer
    # decode: 1 + 0.5 x 1 / 0.1 = 6x slower while the prefill runs; prefill: 1 + 0.5 x 0.1 / 1 = 1.05x
    assert decode.done == pytest.approx(0.0016 * 6)
    beside = 0.0016 * 6  # the prefill's 9.6 ms beside the decode did 9.6 / 1.05 ms of its work
    assert prefill.done == pytest.approx(beside + (0.032 - beside / 1.05))
    # with no wait it is as alone; floors play no part
    free = SharedChip(RATES, interleave=0.0)
    assert free.launch(0.0, 0.0, 0.004, 0.040, layers=4).done == pytest.approx(0.004)


def test_a_device_busy_with_a_copy_wakes_at_its_end_not_at_its_next_timer():
    """At their own pace a device that activates a model (its clock moves by the weight copy)
    with nothing else to do waits for its next idle timer; until the copy is over it is busy
    (messages wait), and then it wakes, so what came meanwhile (the request the activation was
    for) is read at once, not when the timer falls due."""
    from prism.sim.cluster import SimCluster
    from prism.worker import messages as msg

    raw = {"devices": RAW["devices"], "models": [BIG, SMALL], "scheduler": {"pace": "own", "idle_evict_s": 60}}
    cluster = SimCluster(config_for(raw, "prism"), ROOFLINE)
    cluster.run([])  # the start settles
    st = cluster.devices["cuda:0"]
    cluster.deliver("cuda:0", msg.Evict("big"))
    cluster._run_device("cuda:0", st.token)
    assert not st.device.engines["big"].resident
    cluster.now = st.device.clock.now() + 1.0
    cluster.deliver("cuda:0", msg.Activate("big"))
    cluster._run_device("cuda:0", st.token)
    copy_end = st.device.clock.now()
    assert st.device.engines["big"].resident and copy_end > cluster.now  # the copy took time
    assert st.busy and st.wake_at == copy_end  # not the idle timer, 60 s away


# ---- one worker process: launches take turns on its host thread ----------------------------------
def test_on_one_host_thread_a_launch_waits_while_another_holds_it():
    """Two models launch at 0: big's 12 ms launch (an eager prefill) holds the thread, so
    small's decode starts its host time only at 12 ms; with a process each, at once."""
    one, apart = SharedChip(RATES, one_host_thread=True), SharedChip(RATES)
    steps = {}
    for name, chip in (("one", one), ("apart", apart)):
        big = chip.launch(0.0, 0.001, 0.050, 0.001, hold_s=0.012)  # use 0.02: no contention to speak of
        small = chip.launch(0.0, 0.001, 0.002, 0.0001, hold_s=0.0007)
        steps[name] = big, small
    big, small = steps["one"]
    assert one.host_free == pytest.approx(0.0127)
    assert small.starts == pytest.approx(0.013) and small.done == pytest.approx(0.015)
    assert big.starts == pytest.approx(0.001)  # its kernels run while it is still launching
    big, small = steps["apart"]
    assert small.starts == pytest.approx(0.001) and small.done == pytest.approx(0.003)


def test_on_one_host_thread_a_step_ends_no_earlier_than_its_launch():
    chip = SharedChip(RATES, one_host_thread=True)
    step = chip.launch(1.0, 0.0005, 0.004, 0.002, hold_s=0.012)  # its device work outruns its launch
    assert step.done == pytest.approx(1.012)
    later = chip.launch(1.001, 0.0, 0.001, 0.0005, hold_s=0.001)  # the thread is free at 1.012
    assert later.done == pytest.approx(1.013)
    assert step.done == pytest.approx(1.012)  # a later launch keeps the floor of the earlier one


def test_a_launch_model_without_one_host_thread_charges_nothing():
    """The launch model's fields alone change no record: only `one_host_thread` turns it on."""
    import dataclasses

    from prism.sim.costs import HostOverheads

    trace = micro_trace()
    launch = HostOverheads(launch_s=0.5e-3, launch_seq_s=20e-6, launch_prefill_layer_s=200e-6,
                           launch_eager_layer_s=300e-6)
    plain = run(trace, "own")
    assert run(trace, "own", profiles=ProfileSet({}, {}, launch)) == plain
    one = run(trace, "own", profiles=ProfileSet({}, {}, dataclasses.replace(launch, one_host_thread=True)))
    assert one != plain
    # the small model's decodes wait behind big's eager prefill launches (32 layers x 0.5 ms)
    assert max(small_gaps(one)) > max(small_gaps(plain)) + 0.010
