"""The swap baseline's residency: one model at a time, in arrival groups."""
from prism.sched.swap import plan_swap
from prism.sched.view import SLO, DeviceView, ModelView, RequestView

SLO_ = SLO(1.0, 0.1)


def model(name, resident, weight=10, kv=0, last_used=0.0):
    return ModelView(name, resident, last_used, weight, kv)


def req(rid, model_id, arrival, running=False):
    return RequestView(rid, model_id, arrival, SLO_, 10, 10 if running else 0, 1 if running else 0, 5,
                       running=running, first_token_time=arrival + 0.1 if running else None,
                       last_token_time=arrival + 0.1 if running else None)


def view(models, requests, free=100, now=10.0):
    return DeviceView(now, 100, free, tuple(models), tuple(requests))


def test_the_oldest_request_decides_whose_turn_it_is():
    v = view([model("a", True), model("b", False)], [req("b1", "b", 1.0), req("a1", "a", 2.0)], free=0)
    evict, activate, drain = plan_swap(v, max_resident=1)
    assert drain == ("a",) and evict == ("a",) and activate == ("b",)


def test_a_model_out_of_turn_drains_before_it_is_evicted():
    v = view([model("a", True), model("b", False)],
             [req("a0", "a", 0.5, running=True), req("b1", "b", 1.0), req("a1", "a", 2.0)], free=0)
    evict, activate, drain = plan_swap(v, max_resident=1)
    # a's running request is older than b's, so it is still a's turn: nothing changes.
    assert (evict, activate, drain) == ((), (), ())
    v = view([model("a", True), model("b", False)],
             [req("a0", "a", 1.5, running=True), req("b1", "b", 1.0)], free=0)
    evict, activate, drain = plan_swap(v, max_resident=1)
    assert drain == ("a",) and evict == () and activate == ()  # a drains: its request still runs


def test_idle_residents_make_way_and_nothing_moves_without_demand():
    v = view([model("a", True, last_used=5.0), model("b", False)], [req("b1", "b", 1.0)], free=0)
    assert plan_swap(v, max_resident=1) == (("a",), ("b",), ())
    v = view([model("a", True), model("b", False)], [], free=0)
    assert plan_swap(v, max_resident=1) == ((), (), ())


def test_two_slots_hold_the_two_oldest_groups():
    v = view([model("a", True), model("b", False), model("c", False)],
             [req("c1", "c", 3.0), req("b1", "b", 1.0), req("a1", "a", 2.0)], free=20)
    evict, activate, drain = plan_swap(v, max_resident=2)
    assert evict == () and activate == ("b",) and drain == ()
