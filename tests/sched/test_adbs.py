"""MuxServe's adaptive batch scheduling (prism/sched/adbs.py), as a pure policy."""
import pytest

from prism.sched.adbs import Adbs, kv_quotas
from prism.sched.local import LocalPolicy, LocalScheduler, LocalSchedulerConfig
from prism.sched.view import SLO, DeviceView, ModelView, RequestView

WINDOW = 60.0


class Cost:
    def prefill_time(self, model_id, num_tokens):
        return 0.001 * num_tokens

    def decode_step_time(self, model_id, batch_size, num_context_tokens):
        return 0.01

    def activation_time(self, model_id):
        return 1.0


def adbs_scheduler():
    return LocalScheduler(LocalSchedulerConfig(policy=LocalPolicy.ADBS), Cost())


def model(name, kv_pages=0, kv_per_token=0.01, last_step=float("-inf")):
    return ModelView(name, True, 0.0, weight_pages=100, kv_pages=kv_pages, kv_pages_per_token=kv_per_token,
                     last_step=last_step)


def req(req_id, model_id, arrival=0.0, running=False, decoding=False):
    return RequestView(req_id, model_id, arrival, SLO(1.0, 0.1), num_prompt_tokens=100,
                       num_computed_tokens=100 if running else 0, num_output_tokens=1 if decoding else 0,
                       max_tokens=10, first_token_time=arrival if decoding else None, running=running)


def view(models, requests=(), rates=None, budget=1200):
    return DeviceView(10.0, budget, 0, tuple(models), tuple(requests), rates or {})


def test_quotas_split_the_pool_by_rate_times_kv_bytes():
    # pool = 1200 - 2 x 100 weight pages = 1000
    q = kv_quotas(view([model("a"), model("b")], rates={"a": 3.0, "b": 1.0}), WINDOW)
    assert q == {"a": 750, "b": 250}
    # a model whose tokens take twice the KV gets twice the share at the same rate
    q = kv_quotas(view([model("a", kv_per_token=0.02), model("b")], rates={"a": 1.0, "b": 1.0}), WINDOW)
    assert q["a"] == pytest.approx(2 * q["b"], abs=1)


def test_a_model_never_measured_still_has_a_share():
    # b had no request in the window: it counts as one (1/60 req/s) beside a's 1 req/s
    q = kv_quotas(view([model("a"), model("b")], rates={"a": 1.0}), WINDOW)
    assert q == {"a": int(1000 * 60 / 61), "b": int(1000 / 61)}


def test_what_idle_models_leave_unused_is_lent_to_models_with_waiting_work():
    # equal rates: 500 each; a has a backlog, b uses 100 of its 500 and has nothing waiting
    v = view([model("a", kv_pages=500), model("b", kv_pages=100)],
             [req("a1", "a", running=True, decoding=True), req("a2", "a"), req("b1", "b", running=True, decoding=True)],
             rates={"a": 1.0, "b": 1.0})
    assert kv_quotas(v, WINDOW) == {"a": 900, "b": 500}


def test_a_model_at_its_quota_admits_nothing_new_while_it_holds_requests():
    # both have work waiting (nothing to lend): a holds its whole quota (750 pages)
    v = view([model("a", kv_pages=750), model("b", kv_pages=10)],
             [req("a1", "a", running=True, decoding=True), req("a2", "a"), req("b1", "b")],
             rates={"a": 3.0, "b": 1.0})
    decision = adbs_scheduler().decide(v)
    assert decision.drain == ("a",)
    assert decision.run_model == "b"  # the prefill phase goes to the model that may admit
    # b idle with its quota unused: a borrows it and may admit again
    v = view([model("a", kv_pages=750), model("b", kv_pages=10)],
             [req("a1", "a", running=True, decoding=True), req("a2", "a")], rates={"a": 3.0, "b": 1.0})
    assert adbs_scheduler().decide(v).drain == ()
    # with nothing running it always may (no deadlock on a quota smaller than one request)
    v = view([model("a", kv_pages=750), model("b")], [req("a2", "a")], rates={"a": 3.0, "b": 1.0})
    assert adbs_scheduler().decide(v).drain == ()


def test_prefill_and_decode_phases_alternate_and_models_take_turns_within_each():
    adbs = Adbs(WINDOW)
    models = [model("a", last_step=1.0), model("b", last_step=2.0), model("c", last_step=0.5)]
    requests = [req("a1", "a", running=True, decoding=True), req("b1", "b", running=True, decoding=True),
                req("c1", "c", arrival=5.0)]  # c waits for its prefill
    v = view(models, requests)
    resident = frozenset({"a", "b", "c"})
    assert adbs.plan(v, resident).run_model == "c"  # prefill first
    assert adbs.plan(v, resident).run_model == "a"  # then a decode phase: the oldest last step
    assert adbs.plan(v, resident).run_model == "c"  # prefill again while one waits
    # no prefill waiting: decode phases only
    v = view(models, requests[:2])
    assert adbs.plan(v, resident).run_model == adbs.plan(v, resident).run_model == "a"
