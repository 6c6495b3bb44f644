"""The sliding-window token rate tracker: window edges, both recording styles, brute force."""
import random

import pytest

from prism.sched.rates import TokenRateTracker


def test_entries_older_than_the_window_stop_counting():
    t = TokenRateTracker(window_s=60.0)
    t.record("a", 0.0, 100)
    t.record("a", 30.0, 50)
    assert t.rate("a", 30.0) == 150 / 60
    assert t.request_rate("a", 30.0) == 2 / 60
    assert t.rate("a", 59.9) == 150 / 60
    assert t.rate("a", 60.0) == 50 / 60  # exactly window_s old: out
    assert t.request_rate("a", 60.0) == 1 / 60
    assert t.rate("a", 89.9) == 50 / 60
    assert t.rate("a", 90.0) == 0.0
    assert t.request_rate("a", 90.0) == 0.0
    assert t.last_seen("a") == 30.0  # the latest record, however old


def test_unknown_model_has_no_rate_and_was_never_seen():
    t = TokenRateTracker()
    assert t.rate("nobody", 5.0) == 0.0
    assert t.request_rate("nobody", 5.0) == 0.0
    assert t.last_seen("nobody") is None
    assert t.models() == ()


def test_arrival_counts_prompt_and_max_tokens_completion_the_actual_output():
    t = TokenRateTracker(window_s=10.0)
    t.record_arrival("a", 1.0, num_prompt_tokens=30, max_tokens=70)
    t.record_completion("b", 2.0, num_prompt_tokens=30, num_output_tokens=20)
    assert t.rate("a", 2.0) == 100 / 10
    assert t.rate("b", 2.0) == 50 / 10
    assert t.request_rate("a", 2.0) == t.request_rate("b", 2.0) == 1 / 10
    assert t.models() == ("a", "b")
    assert t.token_rates(2.0) == {"a": 10.0, "b": 5.0}
    assert t.last_requests() == {"a": 1.0, "b": 2.0}


def test_models_are_tracked_separately():
    t = TokenRateTracker(window_s=10.0)
    t.record("a", 0.0, 10)
    t.record("b", 8.0, 20)
    assert t.rate("a", 12.0) == 0.0
    assert t.rate("b", 12.0) == 2.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        TokenRateTracker(window_s=0)
    t = TokenRateTracker()
    t.record("a", 5.0, 1)
    t.record("a", 5.0, 1)  # equal times are fine
    with pytest.raises(ValueError, match="time order"):
        t.record("a", 4.0, 1)
    with pytest.raises(ValueError, match=">= 0"):
        t.record("a", 6.0, -1)
    t.record("b", 1.0, 1)  # another model has its own timeline


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_brute_force_recount(seed):
    rng = random.Random(seed)
    window = rng.choice([1.0, 7.5, 60.0])
    t = TokenRateTracker(window_s=window)
    events: list[tuple[str, float, int]] = []
    now = 0.0
    for _ in range(2000):
        now += rng.expovariate(5.0) if rng.random() < 0.9 else rng.uniform(0, 2 * window)
        model_id = rng.choice("abc")
        if rng.random() < 0.6:
            tokens = rng.randint(0, 4000)
            t.record(model_id, now, tokens)
            events.append((model_id, now, tokens))
        else:  # query at this time
            live = [n for m, ts, n in events if m == model_id and now - ts < window]
            assert t.rate(model_id, now) == sum(live) / window
            assert t.request_rate(model_id, now) == len(live) / window
    # Pruning keeps only what is in the window (memory stays bounded).
    for model_id in "abc":
        t.rate(model_id, now)
        live = [1 for m, ts, _ in events if m == model_id and now - ts < window]
        assert len(t._entries.get(model_id, ())) == len(live)


# ---- the rates a placement made once goes by -------------------------------------------------
def test_window_request_rates_count_the_first_window_only_from_time_zero():
    from prism.sched.rates import window_request_rates

    arrivals = [("a", 0.0), ("b", 1.0), ("a", 2.0), ("a", 9.9), ("b", 10.0), ("b", 50.0)]
    rates = window_request_rates(arrivals, 10.0)
    assert rates == {"a": 0.3, "b": 0.1}  # the arrival at 0 counts; those at 10 s and after do not
    assert window_request_rates([], 10.0) == {}


def test_placement_rates_override_then_measured_then_equal():
    from prism.sched.rates import placement_rates

    models = ["a", "b", "c"]
    assert placement_rates(models, {}, None) == {"a": 1.0, "b": 1.0, "c": 1.0}  # a server at start
    assert placement_rates(models, {"b": 5.0}, None) == {"a": 1.0, "b": 5.0, "c": 1.0}
    # measured: c had no request in the window: as if one came (a placement must leave it room)
    got = placement_rates(models, {"b": 5.0}, {"a": 0.3, "b": 0.1}, window_s=10.0)
    assert got == {"a": 0.3, "b": 5.0, "c": 0.1}
