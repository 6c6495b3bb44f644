"""The local scheduler on hand-built device views, with a fixed cost model."""
import random

import pytest

from prism.sched.clock import ManualClock
from prism.sched.local import LocalScheduler, LocalSchedulerConfig
from prism.sched.view import SLO, DeviceView, ModelView, RequestView


class FixedCost:
    """1 ms per prefill token, 10 ms per decode step, 1 s per activation."""

    def prefill_time(self, model_id: str, num_tokens: int) -> float:
        return 0.001 * num_tokens

    def decode_step_time(self, model_id: str, batch_size: int, num_context_tokens: int) -> float:
        return 0.010

    def activation_time(self, model_id: str) -> float:
        return 1.0


def req(req_id, model_id, arrival, ttft, *, tpot=0.1, prompt=100, computed=0, out=0, running=False,
        first=None, last=None, priority=0):
    return RequestView(
        req_id=req_id, model_id=model_id, arrival=arrival, slo=SLO(ttft_s=ttft, tpot_s=tpot),
        num_prompt_tokens=prompt, num_computed_tokens=computed, num_output_tokens=out,
        max_tokens=64, first_token_time=first, last_token_time=last, running=running,
        priority=priority,
    )


def decoding(req_id, model_id, arrival, *, last, tpot=0.1, prompt=100):
    """A running request past its first token (its prompt and one output token cached)."""
    return req(req_id, model_id, arrival, 1.0, tpot=tpot, prompt=prompt, computed=prompt + 1,
               out=1, running=True, first=last, last=last)


def model(model_id, *, resident=True, last_used=0.0, weight=10, kv=0, activating=False, kv_per_token=0.0,
          last_step=float("-inf")):
    return ModelView(model_id=model_id, resident=resident, last_used=last_used, weight_pages=weight,
                     kv_pages=kv, activating=activating, kv_pages_per_token=kv_per_token, last_step=last_step)


def view(now, models, requests, *, free=100, budget=1000):
    return DeviceView(now=now, budget_pages=budget, free_pages=free, models=tuple(models),
                      requests=tuple(requests))


def sched(policy="prism", **knobs):
    return LocalScheduler(LocalSchedulerConfig(policy=policy, **knobs), FixedCost())


def ids(requests):
    return [r.req_id for r in requests]


AB = [model("A"), model("B")]


# ---- config ---------------------------------------------------------------------------------
def test_config_rejects_unknown_policy_and_negative_knobs():
    with pytest.raises(ValueError, match="policy"):
        LocalSchedulerConfig(policy="edf")
    with pytest.raises(ValueError):
        LocalSchedulerConfig(idle_evict_s=-1.0)
    with pytest.raises(ValueError):
        LocalSchedulerConfig(late_contender_ttft_multiple=0.0)
    with pytest.raises(ValueError, match="idle_evict"):
        LocalSchedulerConfig(idle_evict="never")


# ---- slack ----------------------------------------------------------------------------------
def test_slack_of_each_kind_of_request():
    s = sched()
    dec = decoding("d", "A", 0.0, last=9.95, tpot=0.1)
    pre = req("p", "A", 9.8, 0.5, prompt=200, computed=50, running=True)  # 150 tokens left
    cold = req("c", "C", 9.9, 2.0, prompt=100)
    v = view(10.0, [model("A"), model("C", resident=False)], [dec, pre, cold])
    assert s.slack(dec, v) == pytest.approx(9.95 + 0.1 - 10.0 - 0.010)
    assert s.slack(pre, v) == pytest.approx(10.3 - 10.0 - 0.150)
    assert s.slack(cold, v) == pytest.approx(11.9 - 10.0 - 0.100 - 1.0)  # + activation


def test_preempted_request_is_due_by_its_next_token():
    s = sched()
    # Recomputed after a preemption: its KV is gone, 100 prompt + 5 output tokens to redo.
    r = req("r", "A", 0.0, 0.5, prompt=100, out=5, first=1.0, last=9.9, tpot=0.2)
    assert s.slack(r, view(10.0, AB, [r])) == pytest.approx(10.1 - 10.0 - 0.105)


# ---- admission order ------------------------------------------------------------------------
def test_tight_b_is_admitted_before_earlier_loose_a_when_both_cannot_be_on_time():
    a = req("a", "A", 0.00, 0.60, prompt=400)  # deadline 0.60, needs 0.4 s
    b = req("b", "B", 0.05, 0.40, prompt=300)  # deadline 0.45, needs 0.3 s
    v = view(0.1, AB, [a, b])
    # Alone each is feasible from now=0.1; together one must miss: Moore-Hodgson keeps b.
    assert ids(sched().order_waiting(v)) == ["b", "a"]
    decision = sched().decide(v)
    assert decision.admit_order == {"B": ("b",), "A": ("a",)}
    assert decision.run_model == "B"
    assert ids(sched("fcfs").order_waiting(v)) == ["a", "b"]
    assert sched("fcfs").decide(v).run_model == "A"


def test_late_requests_follow_feasible_ones_in_arrival_order_and_are_never_dropped():
    late_old = req("late_old", "A", 0.0, 0.5)  # deadline 0.5: late at 1.0
    late_new = req("late_new", "B", 0.2, 0.1)  # deadline 0.3: later arrival, earlier deadline
    loose = req("loose", "A", 0.9, 1.0)  # deadline 1.9
    tight = req("tight", "B", 0.95, 0.2)  # deadline 1.15
    v = view(1.0, AB, [late_old, loose, late_new, tight])
    assert ids(sched().order_waiting(v)) == ["tight", "loose", "late_old", "late_new"]
    admit = sched().decide(v).admit_order
    assert admit == {"B": ("tight", "late_new"), "A": ("loose", "late_old")}


def test_feasible_but_dropped_requests_come_before_late_ones_by_deadline():
    big = req("big", "A", 0.0, 1.0, prompt=900)  # alone feasible (0.9 <= 1.0); crowds out two
    s1 = req("s1", "B", 0.0, 0.2, prompt=100)
    s2 = req("s2", "B", 0.0, 0.3, prompt=100)
    gone = req("gone", "A", -5.0, 1.0)  # long late
    v = view(0.0, AB, [gone, big, s1, s2])
    assert ids(sched().order_waiting(v)) == ["s1", "s2", "big", "gone"]


def test_admission_window_weighs_only_the_earliest_deadlines():
    big = req("big", "A", 0.0, 1.0, prompt=900)  # due 1.0, 0.9 s of prefill
    s1 = req("s1", "B", 0.0, 1.02)  # 0.1 s each: after big, s2 would miss
    s2 = req("s2", "B", 0.0, 1.03)
    late = req("late", "A", -5.0, 1.0)  # long late
    v = view(0.0, AB, [late, s2, big, s1])
    # Weighing all: two small ones on time beat one big one.
    assert ids(sched().order_waiting(v)) == ["s1", "s2", "big", "late"]
    # A window of the two earliest deadlines (late, big) keeps big on time; s1 and s2 queue
    # after it by deadline, ahead of the window's late request; nothing is dropped.
    assert ids(sched(admission_window=2).order_waiting(v)) == ["big", "s1", "s2", "late"]
    with pytest.raises(ValueError):
        LocalSchedulerConfig(admission_window=0)


def test_priority_breaks_deadline_ties():
    lo = req("lo", "A", 0.0, 0.15, prompt=100)
    hi = req("hi", "B", 0.0, 0.15, prompt=100, priority=1)
    v = view(0.0, AB, [lo, hi])
    # Only one fits by 0.15; the higher priority one is kept and goes first.
    assert ids(sched().order_waiting(v)) == ["hi", "lo"]
    assert ids(sched("fcfs").order_waiting(v)) == ["hi", "lo"]


def test_activation_is_charged_to_the_first_kept_request_of_a_cold_model():
    hot = req("hot", "A", 0.0, 1.12, prompt=100)  # resident, deadline 1.12
    x1 = req("x1", "X", 0.0, 0.5, prompt=50)  # cold model: cannot make it through activation
    x2 = req("x2", "X", 0.0, 1.10, prompt=50)  # makes it only if it alone pays the activation
    v = view(0.0, [model("A"), model("X", resident=False, weight=10)], [hot, x1, x2])
    # Were x1 (dropped) charged and x2 not, x2 would look free and go first. Charged
    # correctly, x2 (1.05 s) and hot (0.1 s) cannot both be on time; the longer one yields.
    assert ids(sched().order_waiting(v)) == ["hot", "x2", "x1"]


# ---- which model runs -----------------------------------------------------------------------
def test_runs_the_model_whose_decode_is_about_to_miss_its_tpot():
    waiting_b = req("wb", "B", 9.0, 2.0, prompt=100)  # arrived first; 1.0 s of slack left
    dec_a = decoding("da", "A", 9.5, last=9.915, tpot=0.1)  # next token due 10.015; step 10 ms
    v = view(10.0, AB, [waiting_b, dec_a])
    assert sched().decide(v).run_model == "A"
    assert sched("fcfs").decide(v).run_model == "B"


def test_prefills_follow_edd_order_across_running_and_waiting():
    a_run = req("a", "A", 0.0, 1.5, prompt=500, computed=100, running=True)  # slack 0.6
    b_wait = req("b", "B", 0.5, 0.4, prompt=100)  # slack 0.3
    assert sched().decide(view(0.5, AB, [a_run, b_wait])).run_model == "B"


def test_prefills_run_in_edd_order_not_by_their_own_slack():
    short = req("short", "B", 0.0, 0.19, prompt=50)  # due 0.19, slack 0.14
    long = req("long", "A", 0.0, 0.25, prompt=150)  # due 0.25, slack 0.10
    # Short first: done 0.05 and 0.20, both on time. Long first (least own slack): short
    # would finish at 0.20 > 0.19.
    assert sched().decide(view(0.0, AB, [long, short])).run_model == "B"


def test_fcfs_runs_the_model_of_the_earliest_request_running_or_waiting():
    old_running = decoding("old", "B", 1.0, last=9.0, tpot=10.0)
    newer_waiting = req("new", "A", 2.0, 0.01)
    v = view(10.0, AB, [newer_waiting, old_running])
    assert sched("fcfs").decide(v).run_model == "B"


def test_round_robin_gives_each_model_with_work_a_step_in_turn():
    old_running = decoding("old", "B", 1.0, last=9.0, tpot=10.0)
    newer_waiting = req("new", "A", 2.0, 0.01)
    # A never ran: its turn comes first, though B holds the oldest request
    v = view(10.0, [model("A"), model("B", last_step=9.9)], [newer_waiting, old_running])
    assert sched("rr").decide(v).run_model == "A"
    # then B's, whose last step is now the older one
    v = view(10.1, [model("A", last_step=10.05), model("B", last_step=9.9)], [newer_waiting, old_running])
    assert sched("rr").decide(v).run_model == "B"
    # a model without work gets no turn; one that is not resident neither
    v = view(10.2, [model("A", last_step=10.05), model("B", last_step=9.0), model("C", resident=False)],
             [newer_waiting, req("c", "C", 0.0, 0.01)])
    assert sched("rr").decide(v).run_model == "A"
    # never ran on either side: the earliest-arrived request's model
    v = view(10.0, AB, [newer_waiting, old_running])
    assert sched("rr").decide(v).run_model == "B"


def test_round_robin_admits_each_models_queue_in_arrival_order():
    late_tight = req("tight", "A", 2.0, 0.01)
    early_loose = req("loose", "A", 1.0, 50.0)
    d = sched("rr").decide(view(10.0, AB, [late_tight, early_loose]))
    assert d.admit_order["A"] == ("loose", "tight")


def test_all_late_still_runs_the_most_late():
    a = req("a", "A", 0.0, 0.5, running=True)  # slack 0.5 - 10 - 0.1
    b = req("b", "B", 1.0, 0.5, running=True)  # slack 1.5 - 10 - 0.1
    decision = sched().decide(view(10.0, AB, [b, a]))
    assert decision.run_model == "A"


def test_late_waiting_work_runs_when_nothing_deserving_is_runnable():
    late = req("late", "B", 0.0, 0.1)
    assert sched().decide(view(5.0, AB, [late])).run_model == "B"


def test_late_work_steals_slack_only_when_it_fits():
    relaxed = decoding("d", "A", 0.0, last=10.0, tpot=0.5)  # slack 0.49
    # late, not yet overdue (waited 2x its TTFT SLO)
    short_late = req("late", "B", 9.8, 0.1, prompt=400)  # 0.4 s of prefill fits
    long_late = req("late", "B", 9.8, 0.1, prompt=600)  # 0.6 s would make the decode late
    assert sched().decide(view(10.0, AB, [relaxed, short_late])).run_model == "B"
    assert sched().decide(view(10.0, AB, [relaxed, long_late])).run_model == "A"


def test_late_work_behind_nonstop_decodes_contends_once_overdue():
    # A and B decode without pause (40 ms of slack each step); C's late prefill (100 ms) never
    # fits into that slack, so slack stealing alone would hold it back for as long as they run.
    decodes = [decoding("a", "A", 0.0, last=9.95), decoding("b", "B", 0.0, last=9.95)]
    abc = [*AB, model("C")]
    just_late = req("c", "C", 9.75, 0.1)  # waited 2.5x its TTFT SLO
    overdue = req("c", "C", 9.65, 0.1)  # waited 3.5x
    assert sched().decide(view(10.0, abc, [*decodes, just_late])).run_model in ("A", "B")
    assert sched().decide(view(10.0, abc, [*decodes, overdue])).run_model == "C"
    no_bound = sched(late_contender_ttft_multiple=float("inf"))
    assert no_bound.decide(view(10.0, abc, [*decodes, overdue])).run_model in ("A", "B")


def test_overdue_work_is_not_postponed_by_on_time_prefills_that_fit():
    relaxed = decoding("d", "A", 0.0, last=10.0, tpot=0.5)  # 490 ms of slack
    on_time = req("new", "A", 10.0, 1.0, prompt=50)  # fits into the decode's slack
    overdue = req("old", "B", 0.0, 0.1, prompt=600)  # too long to steal that slack
    assert sched().decide(view(10.0, AB, [relaxed, on_time, overdue])).run_model == "B"


def test_nothing_to_run():
    assert sched().decide(view(0.0, AB, [])).run_model is None
    cold_only = view(0.0, [model("C", resident=False, weight=1000)], [req("c", "C", 0.0, 1.0)])
    decision = sched().decide(cold_only)
    assert decision.run_model is None and decision.activate == ()
    assert decision.admit_order == {"C": ("c",)}


# ---- preemption victim ----------------------------------------------------------------------
def test_choose_victim_most_slack_for_prism_newest_for_fcfs():
    tight = decoding("tight", "A", 5.0, last=9.95, tpot=0.1)
    loose = decoding("loose", "B", 1.0, last=9.95, tpot=2.0)
    newest = decoding("newest", "A", 6.0, last=9.95, tpot=0.1)
    v = view(10.0, AB, [tight, loose, newest])
    assert sched().choose_victim(v, [tight, loose, newest]).req_id == "loose"
    assert sched("fcfs").choose_victim(v, [tight, loose, newest]).req_id == "newest"
    assert sched().choose_victim(v, []) is None


def test_choose_victim_ties_go_to_the_latest_arrival():
    first = decoding("first", "A", 1.0, last=9.95)
    second = decoding("second", "A", 2.0, last=9.95)
    v = view(10.0, AB, [first, second])
    assert sched().choose_victim(v, [second, first]).req_id == "second"


# ---- residency ------------------------------------------------------------------------------
def residency_view(c_weight, *, free=5, now=10.0):
    models = [
        model("X", last_used=1.0, weight=10),  # idle, least recently used
        model("Y", last_used=5.0, weight=8, kv=2),  # idle
        model("Z", last_used=0.0, weight=50),  # oldest, but has a request
        model("R", last_used=9.0, weight=40),  # no requests, but used 1 s ago
        model("C", resident=False, weight=c_weight),
    ]
    requests = [decoding("z", "Z", 0.0, last=9.99), req("c", "C", 9.0, 5.0)]
    return view(now, models, requests, free=free)


def test_activation_evicts_idle_lru_models_without_requests_and_only_as_needed():
    decision = sched().decide(residency_view(15))
    assert decision.evict == ("X",)  # 5 free + 10 = 15: enough
    assert decision.activate == ("C",)
    decision = sched().decide(residency_view(25))
    assert decision.evict == ("X", "Y")  # Y's KV pages count as freed too
    assert decision.activate == ("C",)


def test_kv_headroom_is_kept_free_beyond_the_weights():
    decision = sched(kv_headroom_pages=5).decide(residency_view(15))
    assert decision.evict == ("X", "Y") and decision.activate == ("C",)


def test_models_with_requests_and_recently_used_ones_are_never_evicted_for_an_activation():
    # Z (has a request) and R (used 1 s ago < swap_idle_s) would make room; neither may go.
    decision = sched().decide(residency_view(60))
    assert decision.evict == () and decision.activate == ()
    assert decision.admit_order == {"C": ("c",)}  # it waits, not dropped
    assert decision.run_model == "Z"


def test_activation_follows_demand_order_and_stops_at_what_fits():
    models = [model("P", resident=False, weight=60), model("Q", resident=False, weight=60),
              model("S", resident=False, weight=30)]
    requests = [req("q", "Q", 0.0, 2.0), req("p", "P", 0.0, 5.0), req("s", "S", 0.0, 9.0)]
    decision = sched().decide(view(0.0, models, requests, free=100))
    assert decision.activate == ("Q", "S")  # Q's request is first in order; P no longer fits


def test_activating_models_are_neither_run_nor_activated_again_nor_evicted():
    models = [model("A", resident=False, activating=True, last_used=-100.0), model("B")]
    requests = [req("a", "A", 0.0, 5.0)]
    decision = sched().decide(view(0.0, models, requests))
    assert decision.activate == () and decision.run_model is None
    assert "A" not in decision.evict
    busy_activating = view(0.0, [model("A", resident=True, activating=True)], [req("a", "A", 0, 5)])
    assert sched().decide(busy_activating).run_model is None


@pytest.mark.parametrize("idle_for, evicted", [(44.9, False), (45.0, True), (100.0, True)])
def test_idle_evict_always_evicts_after_idle_evict_s_but_not_before(idle_for, evicted):
    models = [model("idle", last_used=100.0 - idle_for), model("busy", last_used=0.0)]
    requests = [decoding("b", "busy", 0.0, last=99.99, tpot=1.0)]
    decision = sched(idle_evict="always").decide(view(100.0, models, requests))
    assert decision.evict == (("idle",) if evicted else ())


def kv_pressure_view(busy_kv_per_token):
    models = [
        model("busy", last_used=99.0, kv_per_token=busy_kv_per_token),
        model("old", last_used=10.0, weight=10),
        model("older", last_used=0.0, weight=60),
        model("oldest", last_used=-5.0, weight=5, resident=False),  # gone already
        model("recent", last_used=80.0, weight=500),  # idle 20 s < idle_evict_s
    ]
    # prompt 100 + max_tokens 64: 164 tokens, all still to be cached
    return view(100.0, models, [req("b", "busy", 99.9, 1.0)], free=100)


def test_idle_models_stay_while_nothing_needs_their_memory():
    assert sched().decide(kv_pressure_view(0.5)).evict == ()  # wants 82 pages of 100 free


def test_kv_demand_evicts_long_idle_models_longest_idle_first_and_only_as_needed():
    # wants 164 pages, 100 free: "older" (60) and "old" (10) cover it; "recent" is not idle long
    assert sched().decide(kv_pressure_view(1.0)).evict == ("older", "old")
    assert sched().decide(kv_pressure_view(0.7)).evict == ("older",)  # wants 115
    assert sched().decide(kv_pressure_view(9.0)).evict == ("older", "old")  # all it may take


# ---- invariants on random views -------------------------------------------------------------
def random_view(rng: random.Random) -> DeviceView:
    models = []
    for i in range(rng.randint(1, 4)):
        resident = rng.random() < 0.6
        models.append(model(f"m{i}", resident=resident, last_used=rng.uniform(0, 100),
                            weight=rng.randint(5, 50), kv=rng.randint(0, 10) if resident else 0,
                            activating=rng.random() < 0.1))
    requests = []
    for j in range(rng.randint(0, 10)):
        m = rng.choice(models)
        can_run = m.resident and not m.activating and rng.random() < 0.5
        prompt = rng.randint(1, 500)
        if can_run and rng.random() < 0.5:
            requests.append(decoding(f"r{j}", m.model_id, rng.uniform(0, 100),
                                     last=rng.uniform(90, 100), tpot=rng.uniform(0.01, 0.5), prompt=prompt))
        else:
            requests.append(req(f"r{j}", m.model_id, rng.uniform(0, 100), rng.uniform(0.05, 5),
                                prompt=prompt, running=can_run, priority=rng.randint(0, 1)))
    return view(100.0, models, requests, free=rng.randint(0, 60))


@pytest.mark.parametrize("policy", ["prism", "fcfs", "rr"])
def test_decisions_are_consistent_on_random_views(policy):
    rng = random.Random(7)
    s = sched(policy, swap_idle_s=2.0, idle_evict_s=45.0)
    for _ in range(400):
        v = random_view(rng)
        d = s.decide(v)
        models = {m.model_id: m for m in v.models}
        busy = {r.model_id for r in v.requests}
        waiting = [r.req_id for r in v.requests if not r.running]
        admitted = [i for order in d.admit_order.values() for i in order]
        assert sorted(admitted) == sorted(waiting)  # nothing dropped, nothing invented
        for model_id, order in d.admit_order.items():
            assert all(next(r for r in v.requests if r.req_id == i).model_id == model_id for i in order)
        runnable = {r.model_id for r in v.requests if models[r.model_id].resident
                    and not models[r.model_id].activating}
        assert (d.run_model is None) == (not runnable)  # never idle while work can run
        assert d.run_model is None or d.run_model in runnable
        assert not set(d.evict) & busy
        assert all(models[m].resident and not models[m].activating for m in d.evict)
        assert all(not models[m].resident and not models[m].activating for m in d.activate)
        freed = sum(models[m].weight_pages + models[m].kv_pages for m in d.evict)
        taken = sum(models[m].weight_pages for m in d.activate)
        assert v.free_pages + freed - taken >= 0
        assert s.decide(v) == d  # deterministic


# ---- a toy run: under overload prism keeps the tight-SLO model on time -----------------------
def toy_run(policy: str) -> tuple[int, int]:
    """Two resident models on one device. A: a long-prompt, loose-SLO flood (2x the device);
    B: short prompts with a tight TTFT. Each step prefills the head of the chosen model's
    admission order completely (the first token comes when its prefill ends). Returns
    (B requests with TTFT met, B requests)."""
    cost = FixedCost()
    arrivals = [req(f"a{i}", "A", 0.05 * i, 3.0, prompt=100) for i in range(120)]
    arrivals += [req(f"b{i}", "B", 0.013 + 0.4 * i, 0.25, prompt=50) for i in range(15)]
    arrivals.sort(key=lambda r: r.arrival)
    scheduler = sched(policy)
    clock = ManualClock()
    waiting: list[RequestView] = []
    met = 0
    while arrivals or waiting:
        while arrivals and arrivals[0].arrival <= clock.now():
            waiting.append(arrivals.pop(0))
        if not waiting:
            clock.set(arrivals[0].arrival)
            continue
        decision = scheduler.decide(view(clock.now(), AB, waiting))
        head_id = decision.admit_order[decision.run_model][0]
        head = next(r for r in waiting if r.req_id == head_id)
        clock.advance(cost.prefill_time(head.model_id, head.num_prompt_tokens))
        waiting.remove(head)
        if head.model_id == "B" and clock.now() <= head.ttft_deadline:
            met += 1
    return met, 15


def test_toy_overload_prism_meets_more_tight_ttft_deadlines_than_fcfs():
    prism_met, total = toy_run("prism")
    fcfs_met, _ = toy_run("fcfs")
    assert prism_met > fcfs_met, f"B TTFT met: prism {prism_met}/{total}, fcfs {fcfs_met}/{total}"
    assert prism_met == total, f"B TTFT met: prism {prism_met}/{total}, fcfs {fcfs_met}/{total}"


def test_models_beside_the_run_are_ranked_by_slack_under_concurrent_models():
    """Several models per turn: prism names the others least slack first (A's decode is due
    before C's); one model per turn, or a baseline, names none (the device takes them in
    turn)."""
    models = [model("A"), model("B"), model("C")]
    waiting_b = req("wb", "B", 9.0, 1.55, prompt=100)  # its 0.1 s prefill fits every slack: runs
    dec_a = decoding("da", "A", 9.5, last=9.915, tpot=0.5)  # 0.405 s of slack
    dec_c = decoding("dc", "C", 9.6, last=9.95, tpot=0.6)  # 0.54 s of slack
    v = view(10.0, models, [waiting_b, dec_a, dec_c])
    decision = sched(concurrent_models=3).decide(v)
    assert decision.run_model == "B" and decision.beside == ("A", "C")
    assert sched().decide(v).beside is None
    assert sched("rr", concurrent_models=3).decide(v).beside is None


def test_a_model_whose_step_would_make_a_decode_in_the_turn_late_is_not_put_beside():
    """B's 300-token prefill (0.3 s) beside A's decodes (due in 15 ms) would hold A's next
    token back: B waits for a later turn; C's decode step (10 ms, as long as A's) goes beside."""
    models = [model("A"), model("B"), model("C")]
    dec_a = decoding("da", "A", 9.5, last=9.915, tpot=0.1)
    waiting_b = req("wb", "B", 9.0, 0.5, prompt=300)  # 0.2 s of slack: ranked before C
    dec_c = decoding("dc", "C", 9.6, last=9.95, tpot=0.3)  # 0.24 s of slack
    decision = sched(concurrent_models=3).decide(view(10.0, models, [waiting_b, dec_a, dec_c]))
    assert decision.run_model == "A" and decision.beside == ("C",)


def test_at_their_own_pace_every_model_keeps_its_decodes_within_tpot():
    """In turn only the model that runs steps, so only its prefill chunk is cut for its
    decodes' TPOT; at their own pace every model with work steps, so each gets its cut."""
    def with_long_prompt(m):  # a decode just after its first token (no TPOT credit) and 2,000 tokens waiting
        return [decoding(f"d{m}", m, 9.0, last=10.0, tpot=0.011), req(f"w{m}", m, 9.9, 30.0, prompt=2000)]

    v = view(10.0, AB, with_long_prompt("A") + with_long_prompt("B"))
    turn = sched().decide(v)
    own = sched(pace="own").decide(v)
    assert set(turn.token_budget) == {turn.run_model}
    assert set(own.token_budget) == {"A", "B"}
    assert all(1 < budget < 2001 for budget in own.token_budget.values())  # a decode and a cut chunk
    assert own.token_budget[turn.run_model] == turn.token_budget[turn.run_model]
