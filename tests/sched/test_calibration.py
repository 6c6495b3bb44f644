from prism.sched.calibration import CalibratedCost
from prism.sched.cost import step_seconds


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
    # A mixed step is one pass over all 102 tokens (Fixed's decodes add no context cost).
    assert abs(cost.step_time("a", 2, 50, 100) - 0.102) < 1e-12
    assert cost.step_time("a", 2, 50, 0) == 0.01
    assert cost.step_time("a", 0, 0, 100) == 0.1


class Roofline:
    """A step reads the weights once (10 ms) plus 0.1 ms per token, and 1 us per context token."""

    def prefill_time(self, m, n):
        return 0.01 + 0.0001 * n

    def decode_step_time(self, m, b, ctx):
        return 0.01 + 0.0001 * b + 1e-6 * ctx

    def activation_time(self, m):
        return 1.0


def test_a_device_that_runs_as_predicted_keeps_its_correction_at_one_through_mixed_steps():
    # The device takes exactly what the simulator charges (step_seconds). Predicting a mixed
    # step as a decode step plus a prefill counted the weights' 10 ms twice: the correction
    # then fell towards 0.5 and every estimate shrank with it.
    truth = Roofline()
    cost = CalibratedCost(truth, alpha=0.5)
    for _ in range(20):
        for terms in ((8, 8000, 512), (8, 8000, 0), (0, 0, 2048)):
            cost.observe("a", cost.step_time("a", *terms), step_seconds(truth, "a", *terms))
    assert abs(cost.factor["a"] - 1.0) < 1e-9
    assert abs(cost.step_time("a", 8, 8000, 512) - (0.01 + 0.0001 * 520 + 0.008)) < 1e-12


# ---- the prefill margin: the spread the correction leaves on prefill steps ----------------
def test_exact_estimates_leave_no_prefill_margin():
    truth = Roofline()
    cost = CalibratedCost(truth)
    for terms in ((8, 8000, 512), (8, 8000, 0), (0, 0, 2048)) * 20:
        cost.observe_step("a", terms, step_seconds(truth, "a", *terms))
    assert cost.prefill_margin("a") == 1.0
    assert cost.prefill_margin("never-seen") == 1.0


def test_the_margin_is_an_upper_quantile_of_prefill_residuals_and_ages_out():
    cost = CalibratedCost(Fixed(), alpha=0.0, margin_quantile=0.9, margin_window=10)
    cost.factor["a"] = 1.0  # alpha 0: the correction stays at 1, residuals are the ratios
    for ratio in (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5, 2.0):
        cost.observe("a", 0.1, 0.1 * ratio, with_prefill=True)
    assert 1.5 <= cost.prefill_margin("a") <= 2.0
    for _ in range(4):  # decode steps do not count
        cost.observe("a", 0.1, 0.3)
    assert 1.5 <= cost.prefill_margin("a") <= 2.0
    for _ in range(10):  # the slow steps leave the window
        cost.observe("a", 0.1, 0.1, with_prefill=True)
    assert cost.prefill_margin("a") == 1.0
    for _ in range(10):  # faster than estimated: never a margin below 1
        cost.observe("a", 0.1, 0.05, with_prefill=True)
    assert cost.prefill_margin("a") == 1.0
