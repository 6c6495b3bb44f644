import pytest

from prism.sched.clock import Clock, ManualClock, MonotonicClock


def test_manual_clock_moves_only_when_told():
    clock = ManualClock(start=5.0)
    assert clock.now() == 5.0
    assert clock.now() == 5.0
    assert clock.advance(1.5) == 6.5
    clock.set(10.0)
    assert clock.now() == 10.0
    clock.set(10.0)  # staying put is fine
    assert clock.now() == 10.0


def test_manual_clock_defaults_to_zero():
    assert ManualClock().now() == 0.0


def test_manual_clock_never_goes_back():
    clock = ManualClock(start=3.0)
    with pytest.raises(ValueError):
        clock.advance(-0.1)
    with pytest.raises(ValueError):
        clock.set(2.0)
    assert clock.now() == 3.0


def test_monotonic_clock_is_non_decreasing():
    clock = MonotonicClock()
    a, b = clock.now(), clock.now()
    assert b >= a


def test_both_clocks_satisfy_the_protocol():
    def read(clock: Clock) -> float:
        return clock.now()

    assert read(ManualClock(1.0)) == 1.0
    assert read(MonotonicClock()) > 0.0
