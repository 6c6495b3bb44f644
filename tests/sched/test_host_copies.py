"""Host copies per node: the LRU within a budget, the activation preference, cross-node
migration priced as eviction + activation (hand-built views, numbers in comments)."""
from dataclasses import replace

import pytest

from prism.sched.global_view import ClusterView, DeviceState, ModelInfo, NodeState, TransferRates
from prism.sched.host_copies import DropHostCopy, HostCopyPolicy, activation_seconds, migration_seconds
from prism.sched.placement import Activate, GlobalScheduler, GlobalSchedulerConfig, Migrate, kvpr

RATES = TransferRates(h2d_bytes_per_s=10.0, storage_bytes_per_s=2.0)


def model(model_id, weight_bytes=10, kv=1):
    return ModelInfo(model_id, weight_bytes, kv, 1.0)


def view(models, devices, nodes, *, now=0.0, rates=None):
    return ClusterView(now=now, models={m.model_id: m for m in models}, devices=tuple(devices),
                       token_rates=dict(rates or {}), last_request={}, pending={},
                       nodes={n.name: n for n in nodes}, transfer=RATES)


def dev(device_id, node, resident=(), memory=100, draining=()):
    return DeviceState(device_id, memory, tuple(resident), draining=tuple(draining), node=node)


def sched(**knobs):
    knobs.setdefault("kv_headroom_fraction", 0.0)
    return GlobalScheduler(GlobalSchedulerConfig(**knobs))


# ---- what an activation costs ------------------------------------------------------------
def test_activation_reads_storage_only_where_the_node_lacks_the_copy():
    m = model("m", weight_bytes=20)
    a, b = dev("a/cuda:0", "a"), dev("b/cuda:0", "b")
    v = view([m], [a, b], [NodeState("a", host_copies={"m": 20}), NodeState("b")])
    assert activation_seconds(v, "m", a) == pytest.approx(20 / 10)  # the copy in only
    assert activation_seconds(v, "m", b) == pytest.approx(20 / 2 + 20 / 10)  # storage, then the copy
    # a node the view does not list: the single-host assumption (every copy at hand)
    assert activation_seconds(v, "m", dev("cuda:1", "")) == pytest.approx(2.0)


def test_cross_node_migration_is_priced_as_eviction_plus_activation():
    m = model("m", weight_bytes=20)
    src, same, other = dev("a/cuda:0", "a", ["m"]), dev("a/cuda:1", "a"), dev("b/cuda:0", "b")
    v = view([m], [src, same, other], [NodeState("a", host_copies={"m": 20}), NodeState("b")])
    assert migration_seconds(v, "m", same) == activation_seconds(v, "m", same) == pytest.approx(2.0)
    assert migration_seconds(v, "m", other) == pytest.approx(12.0)


# ---- which copies a node keeps -----------------------------------------------------------
def test_lru_drops_the_least_recently_used_copies_until_within_budget():
    models = [model(x) for x in "pqrs"]
    policy = HostCopyPolicy()
    node_devices = [dev("a/cpu:0", "a")]
    copies = {x: 10 for x in "pqrs"}
    # each model in use once, in the order s, q, p (r never): the order they go is r, s, q, p
    for t, x in enumerate("sqp"):
        node_devices = [dev("a/cpu:0", "a", [x])]
        assert policy.decide(view(models, node_devices, [NodeState("a", 100, copies)], now=t)) == []
    idle = [dev("a/cpu:0", "a")]
    v = view(models, idle, [NodeState("a", 25, copies)], now=5)  # 40 bytes held, 25 allowed
    assert policy.decide(v) == [DropHostCopy("a", "r"), DropHostCopy("a", "s")]
    v = view(models, idle, [NodeState("a", 40, copies)], now=6)  # within budget: nothing goes
    assert policy.decide(v) == []
    v = view(models, idle, [NodeState("a", None, copies)], now=6)  # no budget
    assert policy.decide(v) == []


def test_copies_in_use_go_last_but_go_when_the_budget_says_so():
    models = [model("hot", 30), model("old", 10), model("cold", 10)]
    copies = {"hot": 30, "old": 10, "cold": 10}
    policy = HostCopyPolicy()
    policy.decide(view(models, [dev("a/cpu:0", "a", ["old"])], [NodeState("a", None, copies)], now=0))
    # "hot" is resident now: used most recently. Budget 35 of 50: "cold" (never used), then
    # "old" (used at 0) go; "hot" stays.
    on_a = [dev("a/cpu:0", "a", ["hot"])]
    assert policy.decide(view(models, on_a, [NodeState("a", 35, copies)], now=9)) == [
        DropHostCopy("a", "cold"), DropHostCopy("a", "old")]
    # A budget below the resident model's copy alone: it goes too (the operator's hard limit).
    assert policy.decide(view(models, on_a, [NodeState("a", 5, copies)], now=9)) == [
        DropHostCopy("a", "cold"), DropHostCopy("a", "old"), DropHostCopy("a", "hot")]


def test_budgets_are_per_node():
    models = [model("m", 10), model("n", 10)]
    both = {"m": 10, "n": 10}
    v = view(models, [dev("a/cpu:0", "a", ["m"]), dev("b/cpu:0", "b", ["n"])],
             [NodeState("a", 10, both), NodeState("b", 20, both)])
    # node a drops the copy not in use there; node b is within its budget
    assert HostCopyPolicy().decide(v) == [DropHostCopy("a", "n")]


def test_a_draining_model_is_in_use():
    models = [model("m", 10), model("n", 10)]
    v = view(models, [dev("a/cpu:0", "a", ["m"], draining=["m"])], [NodeState("a", 10, {"m": 10, "n": 10})])
    assert HostCopyPolicy().decide(v) == [DropHostCopy("a", "n")]


# ---- activation prefers the node with the copy -----------------------------------------------
def _two_nodes(rates, resident_b=(), copies_b=None):
    models = [model("m", 10), model("busy", 10)]
    devices = [dev("a/cuda:0", "a", ["busy"]), dev("b/cuda:0", "b", resident_b)]
    nodes = [NodeState("a"), NodeState("b", host_copies=copies_b or {})]
    return view(models, devices, nodes, rates=rates)


def test_activation_prefers_the_node_holding_the_copy_when_pressure_is_close():
    # busy's small rate makes device a's KVPR with m (1 + 0.1) / 80 vs b's 1 / 90: b's is lower
    # by 19% < the 20% threshold, so the cheaper activation wins: a holds m's copy.
    v = _two_nodes({"m": 1.0, "busy": 0.1})
    v = replace(v, nodes={"a": NodeState("a", host_copies={"m": 10}), "b": NodeState("b")})
    assert kvpr(v.device("b/cuda:0"), v, extra="m") < kvpr(v.device("a/cuda:0"), v, extra="m")
    assert sched().on_request(v, "m") == [Activate("m", "a/cuda:0")]
    # Without any copy preference (one node, or both holding it) the lower KVPR wins.
    both = replace(v, nodes={n: NodeState(n, host_copies={"m": 10}) for n in "ab"})
    assert sched().on_request(both, "m") == [Activate("m", "b/cuda:0")]


def test_far_less_pressure_elsewhere_beats_the_host_copy():
    # busy's rate 10: a's KVPR with m (1 + 10) / 80 = 0.1375 vs b's 1 / 90 = 0.011: b is lower
    # by 92%, far past the threshold, so m goes to b and reads storage there.
    v = _two_nodes({"m": 1.0, "busy": 10.0})
    v = replace(v, nodes={"a": NodeState("a", host_copies={"m": 10}), "b": NodeState("b")})
    assert sched().on_request(v, "m") == [Activate("m", "b/cuda:0")]
    # ...unless the threshold says pressure that far apart still counts as close
    assert sched(migration_threshold=0.95).on_request(v, "m") == [Activate("m", "a/cuda:0")]


def test_migration_ties_go_to_the_target_whose_node_holds_the_copy():
    # m and "other" are hot on a/cuda:0; moving either to either idle device (a/cuda:1 on the
    # same node, b/cuda:0 on another) gives the same gain, 56%: (10/80 - 5/90) / (10/80).
    models = [model("m", 10), model("other", 10)]
    devices = [dev("a/cuda:0", "a", ["m", "other"]), dev("a/cuda:1", "a"), dev("b/cuda:0", "b")]
    nodes = [NodeState("a", host_copies={"m": 10, "other": 10}), NodeState("b")]
    v = view(models, devices, nodes, rates={"m": 5.0, "other": 5.0})
    moves = sched(migration_threshold=0.1, placement_period_s=0).periodic(v)
    assert moves == [Migrate("m", "a/cuda:0", "a/cuda:1")]
    # the copy on node b only: the move there is the cheaper one (a copy in, no storage read),
    # though the old tie-break (target KVPR, then ids) would pick a/cuda:1
    nodes = [NodeState("a"), NodeState("b", host_copies={"m": 10})]
    v = view(models, devices, nodes, rates={"m": 5.0, "other": 5.0})
    assert sched(migration_threshold=0.1, placement_period_s=0).periodic(v) == [Migrate("m", "a/cuda:0", "b/cuda:0")]
