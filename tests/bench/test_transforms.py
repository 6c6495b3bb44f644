"""Trace transforms: exact results on hand-made traces, shape checks on a real one."""
import numpy as np
import pytest

from prism.bench.sources import TracesNotFoundError, load_azure, traces_dir
from prism.bench.trace import TraceRequest as R
from prism.bench.transforms import (cap_lengths, combine, describe, format_description, map_models,
                                    merge, scale_rate, scale_time, window)

SMALL = [R(0.0, "a", 10, 1), R(1.0, "b", 20, 2), R(2.5, "a", 30, 3), R(4.0, "a", 40, 4),
         R(7.0, "b", 50, 5)]


@pytest.fixture(scope="module")
def conv():
    try:
        traces_dir()
    except TracesNotFoundError as e:
        pytest.skip(f"public traces absent: {e}")
    return load_azure("conv")


def per_minute(trace, minutes):
    return np.bincount([int(r.arrival_s // 60) for r in trace], minlength=minutes)[:minutes]


def test_window():
    assert window(SMALL, 1.0, 4.0) == [R(0.0, "b", 20, 2), R(1.5, "a", 30, 3)]
    assert window(SMALL, 0, 100) == SMALL
    assert window(SMALL, 8, 9) == []
    with pytest.raises(ValueError):
        window(SMALL, 3, 3)


def test_scale_time():
    assert scale_time(SMALL, 2.0) == [R(0.0, "a", 10, 1), R(2.0, "b", 20, 2), R(5.0, "a", 30, 3),
                                      R(8.0, "a", 40, 4), R(14.0, "b", 50, 5)]
    assert [r.arrival_s for r in scale_time(SMALL, 0.5)] == [0, 0.5, 1.25, 2.0, 3.5]
    with pytest.raises(ValueError):
        scale_time(SMALL, 0)


def test_map_models_and_caps():
    mapped = map_models(SMALL, {"a": "x"})
    assert [r.model for r in mapped] == ["x", "b", "x", "x", "b"]
    assert [r.arrival_s for r in mapped] == [r.arrival_s for r in SMALL]
    capped = cap_lengths(SMALL, 25, 3)
    assert [(r.input_len, r.output_len) for r in capped] == [(10, 1), (20, 2), (25, 3), (25, 3), (25, 3)]
    assert [r.output_len for r in cap_lengths(SMALL, None, 2)] == [1, 2, 2, 2, 2]
    with pytest.raises(ValueError):
        cap_lengths(SMALL, 0, None)


def test_inputs_unchanged_and_output_sorted():
    shuffled = [SMALL[3], SMALL[0], SMALL[4], SMALL[1], SMALL[2]]
    copy = list(shuffled)
    assert window(shuffled, 0, 10) == SMALL
    assert map_models(shuffled, {}) == SMALL
    assert merge(SMALL[3:], SMALL[:3]) == SMALL
    assert shuffled == copy


def test_scale_rate_small():
    assert scale_rate(SMALL, 1.0) == SMALL
    assert scale_rate(SMALL, 0.5, seed=1) == scale_rate(SMALL, 0.5, seed=1)
    assert set(scale_rate(SMALL, 0.5, seed=1)) <= set(SMALL)
    doubled = scale_rate(SMALL, 2.0, seed=3)
    assert len(doubled) == 10
    assert set(SMALL) <= set(doubled)  # originals keep their times
    times = [r.arrival_s for r in doubled]
    assert len(set(times)) == 10  # copies are not simultaneous with anything
    # each copy lies between its original and the next arrival, same model and lengths
    for r in doubled:
        if r not in SMALL:
            orig = next(o for o in SMALL if (o.model, o.input_len) == (r.model, r.input_len))
            later = [o.arrival_s for o in SMALL if o.arrival_s > orig.arrival_s]
            assert orig.arrival_s < r.arrival_s < (later[0] if later else orig.arrival_s + 7 / 4)
    assert len(scale_rate(SMALL, 3.0, seed=0)) == 15
    assert 5 <= len(scale_rate(SMALL, 1.5, seed=0)) <= 10
    with pytest.raises(ValueError):
        scale_rate(SMALL, -1.0)


def test_scale_rate_copies_of_simultaneous_arrivals_are_spread():
    trace = [R(0.0, "a", 1, 1), R(0.0, "b", 1, 1), R(1.0, "a", 1, 1)]
    out = scale_rate(trace, 2.0, seed=0)
    assert len(out) == 6
    assert len({r.arrival_s for r in out}) == 5  # only the two originals at 0 coincide


def test_combine_exact():
    lengths = [R(100.0, "other", 7, 70, "hello"), R(200.0, "other", 8, 80)]
    out = combine(SMALL, lengths, seed=0)
    assert [(r.arrival_s, r.model) for r in out] == [(r.arrival_s, r.model) for r in SMALL]
    assert all((r.input_len, r.output_len) in {(7, 70), (8, 80)} for r in out)
    assert all(r.prompt == ("hello" if r.input_len == 7 else None) for r in out)
    assert combine(SMALL, lengths, seed=0) == out
    with pytest.raises(ValueError):
        combine(SMALL, [], seed=0)


def test_describe_small():
    d = describe(SMALL)
    assert d["requests"] == 5 and d["duration_s"] == 7.0 and d["rate"] == pytest.approx(5 / 7)
    assert list(d["models"]) == ["a", "b"]
    assert d["models"]["a"]["requests"] == 3 and d["models"]["a"]["rate"] == pytest.approx(3 / 7)
    # a's gaps are 2.5 and 1.5: mean 2, population std 0.5
    assert d["models"]["a"]["cv"] == pytest.approx(0.25)
    assert d["models"]["b"]["cv"] is None
    assert d["input_len"] == {"mean": 30, "median": 30, "max": 50}
    assert d["output_len"]["median"] == 3
    text = format_description(d)
    assert "5 requests" in text and "a" in text
    assert describe([])["requests"] == 0
    format_description(describe([]))


def test_scale_rate_on_real_trace_keeps_shape(conv):
    minutes = 58
    base = per_minute(conv, minutes)
    half = scale_rate(conv, 0.5, seed=0)
    assert len(half) == pytest.approx(len(conv) / 2, rel=0.05)
    assert np.corrcoef(base, per_minute(half, minutes))[0, 1] > 0.9
    double = scale_rate(conv, 2.0, seed=0)
    assert len(double) == 2 * len(conv)
    assert np.corrcoef(base, per_minute(double, minutes))[0, 1] > 0.9
    assert double[-1].arrival_s < conv[-1].arrival_s + 1.0
    more = scale_rate(conv, 2.5, seed=0)
    assert len(more) == pytest.approx(2.5 * len(conv), rel=0.05)
    assert np.corrcoef(base, per_minute(more, minutes))[0, 1] > 0.9


def test_combine_real_traces(conv):
    code = load_azure("code")
    out = combine(code, conv, seed=0)
    assert [(r.arrival_s, r.model) for r in out] == [(r.arrival_s, r.model) for r in code]
    conv_pairs = {(r.input_len, r.output_len) for r in conv}
    assert all((r.input_len, r.output_len) in conv_pairs for r in out)
    # the output lengths now look like conv (median 129), not code (median 13)
    assert 100 < describe(out)["output_len"]["median"] < 160
