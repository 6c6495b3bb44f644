from prism.sched.calibration import CalibratedCost


class Fixed:
    def prefill_time(self, m, n):
        return 0.001 * n

    def decode_step_time(self, m, b, ctx):
        return 0.01

    def activation_time(self, m):
        return 1.0


def test_correction_converges_on_measured_ratio_per_model():
    cost = CalibratedCost(Fixed(), alpha=0.5)
    assert cost.decode_step_time("a", 4, 100) == 0.01
    for _ in range(30):
        cost.observe("a", 0.01, 0.06)  # this device is 6x slower than the estimate
    assert abs(cost.decode_step_time("a", 4, 100) - 0.06) < 1e-6
    assert abs(cost.prefill_time("a", 100) - 0.6) < 1e-6
    assert cost.decode_step_time("b", 4, 100) == 0.01  # other models untouched
    assert cost.activation_time("a") == 1.0


def test_non_positive_samples_are_ignored_and_ratios_bounded():
    cost = CalibratedCost(Fixed(), bounds=(0.1, 10))
    cost.observe("a", 0.01, 0.0)  # a manual clock that did not move
    cost.observe("a", 0.0, 0.5)
    assert "a" not in cost.factor
    cost.observe("a", 0.01, 100.0)
    assert cost.factor["a"] == 10
    assert cost.step_time("a", 2, 50, 100) == 0.01 + 0.1
