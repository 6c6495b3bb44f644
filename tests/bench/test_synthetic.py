"""The synthetic generator: power-law popularity, Gamma burstiness, on/off, determinism."""
import statistics

import pytest

from prism.bench.synthetic import popularity_weights, synthetic_trace
from prism.bench.transforms import describe


def counts(trace):
    c = {}
    for r in trace:
        c[r.model] = c.get(r.model, 0) + 1
    return c


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_power_law_popularity(alpha):
    trace = synthetic_trace(4, 5000, 8.0, alpha=alpha, seed=3)
    c = counts(trace)
    assert c["m0"] / c["m1"] == pytest.approx(2 ** alpha, rel=0.06)
    assert c["m0"] > c["m1"] > c["m2"] > c["m3"]
    assert len(trace) == pytest.approx(8.0 * 5000, rel=0.03)


def test_weights():
    w = popularity_weights(3, 1.0)
    assert w.sum() == pytest.approx(1.0)
    assert list(w) == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    assert list(popularity_weights(4, 0.0)) == pytest.approx([0.25] * 4)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_interarrival_cv(cv):
    trace = synthetic_trace(2, 1500, 20.0, alpha=0.0, cv=cv, seed=11)
    for model, stats in describe(trace)["models"].items():
        assert stats["requests"] > 10000
        assert stats["cv"] == pytest.approx(cv, rel=0.15), model


def test_cv_zero_is_evenly_spaced():
    trace = synthetic_trace(1, 10, 2.0, cv=0.0, seed=0)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(trace, trace[1:])]
    assert gaps == pytest.approx([0.5] * len(gaps))


def test_on_off_leaves_gaps():
    dur, on, off = 3000.0, 20.0, 40.0
    plain = synthetic_trace(1, dur, 5.0, on_off=None, seed=5)
    onoff = synthetic_trace(1, dur, 5.0, on_off=(on, off), seed=5)
    gaps = sorted(b.arrival_s - a.arrival_s for a, b in zip(onoff, onoff[1:]))
    long = [g for g in gaps if g > 5]
    # about dur / (on + off) = 50 off periods, mean 40 s each
    assert 25 < len(long) < 80
    assert statistics.fmean(long) == pytest.approx(off, rel=0.35)
    assert max(b.arrival_s - a.arrival_s for a, b in zip(plain, plain[1:])) < 5
    # the long-run rate is kept: the on-rate is raised by (on + off) / on
    assert len(onoff) == pytest.approx(len(plain), rel=0.25)
    # arrivals inside on periods come at about 3x the average rate
    short = [g for g in gaps if g <= 5]
    assert statistics.fmean(short) == pytest.approx(1 / (5.0 * (on + off) / on), rel=0.1)


def test_deterministic_and_seed_dependent():
    kw = dict(alpha=1.2, cv=2.0, on_off=(10.0, 5.0), input_lens=(10, 20), output_lens=(1, 3))
    a = synthetic_trace(3, 200, 4.0, seed=7, **kw)
    b = synthetic_trace(3, 200, 4.0, seed=7, **kw)
    c = synthetic_trace(3, 200, 4.0, seed=8, **kw)
    assert a == b
    assert a != c
    assert all(a_.arrival_s <= b_.arrival_s for a_, b_ in zip(a, a[1:]))
    assert all(0 <= r.arrival_s < 200 for r in a)


def test_lengths_ranges_and_samples():
    trace = synthetic_trace(2, 100, 10.0, input_lens=(5, 9), output_lens=(2, 2), seed=1)
    assert {r.input_len for r in trace} == set(range(5, 10))
    assert {r.output_len for r in trace} == {2}
    pairs = [(100, 7), (3000, 1)]
    trace = synthetic_trace(2, 100, 10.0, input_lens=pairs, output_lens=None, seed=1)
    assert {(r.input_len, r.output_len) for r in trace} == set(pairs)


def test_model_names_and_errors():
    trace = synthetic_trace(2, 50, 4.0, seed=0, model_names=["big", "small"])
    assert set(counts(trace)) == {"big", "small"}
    for bad in (dict(num_models=0), dict(total_rate=0), dict(cv=-1), dict(alpha=-0.5),
                dict(model_names=["a"]), dict(on_off=(0, 5)),
                dict(input_lens=(10, 5)), dict(input_lens=[(1, 2)])):
        args = dict(num_models=2, duration_s=10, total_rate=1.0) | bad
        with pytest.raises(ValueError):
            synthetic_trace(**args)
