"""Placing tensor-parallel models: distinct GPUs of one host, per-shard accounting, KVPR."""
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism.sched.global_view import ClusterView, DeviceState, ModelInfo
from prism.sched.placement import kvpr
from prism.sched.tp_placement import DeviceLoad, TPModel, device_loads, fits, landing_kvpr, place_tp


def gpu(device_id, *, memory=100, weights=0, demand=0.0, host="h0", hosted=()):
    return DeviceLoad(device_id, memory, weights, demand, host, tuple(hosted))


def tp_model(tp=2, *, weights=10, kv=1, rate=0.0, tpot=1.0, model_id="big"):
    return TPModel(model_id, tp, weights, kv, rate, tpot)


def test_per_shard_accounting_by_hand():
    # Shard demand: rate 40 tok/s x 2 bytes/token / 0.5 s = 160; the GPU had demand 40 over
    # 100 - 20 = 80 free bytes; with the shard: (40 + 160) / (80 - 30) = 4.
    m = tp_model(weights=30, kv=2, rate=40, tpot=0.5)
    d = gpu("g0", weights=20, demand=40)
    assert m.shard_demand == 160
    assert d.kvpr() == 0.5
    assert landing_kvpr(d, m) == 4.0


def test_picks_the_lowest_pressure_gpus_and_reports_the_groups_maximum():
    m = tp_model(tp=2, weights=10, kv=1, rate=9)  # shard demand 9
    devices = [gpu("g0", demand=81), gpu("g1", demand=0), gpu("g2", demand=9), gpu("g3", demand=45)]
    placed = place_tp(devices, m, headroom_fraction=0.0)
    assert placed.device_ids == ("g1", "g2")
    assert placed.kvpr == pytest.approx((9 + 9) / 90)  # g2 is the hotter of the two


def test_a_gpu_where_the_shard_does_not_fit_is_skipped():
    m = tp_model(tp=2, weights=50)
    devices = [gpu("g0", weights=60), gpu("g1", weights=10, demand=5), gpu("g2", weights=20, demand=5)]
    assert not fits(devices[0], m, 0.0)
    assert place_tp(devices, m, headroom_fraction=0.0).device_ids == ("g1", "g2")
    # Headroom: 100 - 20 - 50 = 30 left on g2, less than 35% of its memory.
    assert place_tp(devices, m, headroom_fraction=0.35) is None


def test_too_few_gpus_gives_none():
    assert place_tp([gpu("g0"), gpu("g1")], tp_model(tp=4)) is None


def test_shards_go_on_distinct_gpus_that_do_not_hold_the_model_already():
    m = tp_model(tp=2)
    devices = [gpu("g0", hosted=("big",)), gpu("g1"), gpu("g2")]
    placed = place_tp(devices, m)
    assert placed.device_ids == ("g1", "g2")
    assert len(set(placed.device_ids)) == 2


def test_a_group_stays_within_one_host():
    m = tp_model(tp=2, rate=1)
    devices = [
        gpu("a0", host="a", demand=50), gpu("a1", host="a", demand=50),  # a: both hot
        gpu("b0", host="b", demand=0),  # b: one cool GPU is not a group
        gpu("c0", host="c", demand=10), gpu("c1", host="c", demand=20),
    ]
    assert place_tp(devices, m).device_ids == ("c0", "c1")


def test_without_traffic_the_group_with_most_kv_room_wins_and_ranks_follow_device_ids():
    m = tp_model(tp=2, weights=10)
    devices = [gpu("g3", weights=5), gpu("g0", weights=40), gpu("g2", weights=0), gpu("g1", weights=30)]
    placed = place_tp(devices, m)
    assert placed.kvpr == 0.0
    assert placed.device_ids == ("g2", "g3")  # the two emptiest, rank 0 on the lower id


def test_device_loads_speak_placements_kvpr():
    # A TP model is registered with per-shard numbers and listed on each GPU of its group.
    models = {
        "small": ModelInfo("small", 20, 4, 0.5),
        "big": ModelInfo("big", 30, 2, 0.25),  # per shard
    }
    devices = (DeviceState("g0", 100, ("small", "big")), DeviceState("g1", 100, ("big",)),
               DeviceState("g2", 100, ()))
    view = ClusterView(0.0, models, devices, {"small": 10.0, "big": 5.0}, {}, {})
    loads = device_loads(view, hosts={"g0": "h", "g1": "h", "g2": "h"})
    for load, state in zip(loads, devices):
        assert load.kvpr() == pytest.approx(kvpr(state, view))
    assert loads[0].weight_bytes == 50 and loads[1].hosted == ("big",)
    # Landing a shard of another model matches kvpr(..., extra=) for a model so registered.
    other = TPModel("other", 2, 15, 3, 4.0, 0.5)
    models_with = {**models, "other": ModelInfo("other", 15, 3, 0.5)}
    view_with = ClusterView(0.0, models_with, devices, {"small": 10.0, "big": 5.0, "other": 4.0}, {}, {})
    for load, state in zip(loads, devices):
        assert landing_kvpr(load, other) == pytest.approx(kvpr(state, view_with, extra="other"))
    # "big" is already on g0 and g1: a second copy could go only on g2, not a group of 2.
    big = TPModel("big", 2, 30, 2, 5.0, 0.25)
    assert place_tp(loads, big) is None


def test_no_room_for_kv_is_infinite_pressure():
    assert gpu("g0", weights=100).kvpr() == math.inf


def test_bad_models_are_refused():
    with pytest.raises(ValueError):
        TPModel("m", 0, 1, 1, 0.0, 1.0)
    with pytest.raises(ValueError):
        TPModel("m", 2, 1, 1, 0.0, 0.0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 90), st.integers(0, 50), st.sampled_from("ab")), min_size=1, max_size=7),
    st.integers(1, 4), st.integers(0, 40), st.integers(0, 20),
)
def test_the_choice_minimises_the_groups_maximum_pressure(gpus, tp, weights, rate):
    devices = [gpu(f"g{i}", weights=w, demand=float(dem), host=h) for i, (w, dem, h) in enumerate(gpus)]
    m = tp_model(tp=tp, weights=weights, kv=1, rate=rate)
    placed = place_tp(devices, m, headroom_fraction=0.1)
    groups = [
        g for g in itertools.combinations(devices, tp)
        if len({d.host for d in g}) == 1 and all(fits(d, m, 0.1) for d in g)
    ]
    if not groups:
        assert placed is None
        return
    best = min(max(landing_kvpr(d, m) for d in g) for g in groups)
    assert placed is not None and placed.kvpr == best
    chosen = [d for d in devices if d.device_id in placed.device_ids]
    assert len(chosen) == tp and len({d.host for d in chosen}) == 1
    assert all(fits(d, m, 0.1) for d in chosen)
