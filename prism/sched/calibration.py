"""Cost estimates that learn from the device: a per-model correction of any CostModel, and
how far the corrected estimates of prefill steps still miss (their spread).

The worker reports, after every step, what the step was predicted to cost and what it took;
the correction is an exponentially weighted mean of measured / predicted, so estimates from
a nominal device (or an old profile) converge on what this process really achieves.

A mean corrects the bias, not the spread: a step whose kernels load for the first time, a
batch the profile did not measure, host time that does not scale with the step, all make
single prefill steps run longer than the corrected estimate. `prefill_margin` is an upper
quantile of that residual (measured / corrected prediction) over the model's recent steps
that carried prefill tokens, so the local scheduler can plan a prefill for its likely-worst
duration. Where the estimates are exact the residuals are 1 and the margin is 1 (none).
"""
from __future__ import annotations

import statistics
from collections import deque

from prism.sched.cost import step_seconds
from prism.sched.view import CostModel

# The prefill margin: this quantile of the residuals (the likely-worst case, not the worst
# one ever seen, which a single cold step would set for good) over this many recent prefill
# steps of the model (a window, so a spread that has passed, say first-use costs, ages out).
MARGIN_QUANTILE = 0.9
MARGIN_WINDOW = 100
EXACT_TOLERANCE = 1e-9


class CalibratedCost:
    def __init__(self, base: CostModel, alpha: float = 0.2, bounds: tuple[float, float] = (0.02, 50.0),
                 margin_quantile: float = MARGIN_QUANTILE, margin_window: int = MARGIN_WINDOW):
        self.base = base
        self.alpha = alpha
        self.bounds = bounds
        self.factor: dict[str, float] = {}
        self.margin_quantile = margin_quantile
        self.margin_window = margin_window
        self._residuals: dict[str, deque[float]] = {}  # per model: recent prefill steps' residuals
        self._margin: dict[str, float] = {}

    def observe(self, model_id: str, predicted_s: float, measured_s: float, with_prefill: bool = False) -> None:
        """One step's prediction (uncorrected, `step_time`) and measurement (ignored when either
        is not positive, e.g. under a manual clock that does not move during a step).
        `with_prefill`: the step computed prefill tokens (its residual joins the margin's)."""
        if predicted_s <= 0 or measured_s <= 0:
            return
        lo, hi = self.bounds
        old = self.factor.get(model_id)
        if with_prefill:
            self._add_residual(model_id, measured_s / (predicted_s * (1.0 if old is None else old)))
        ratio = min(max(measured_s / predicted_s, lo), hi)
        self.factor[model_id] = ratio if old is None else (1 - self.alpha) * old + self.alpha * ratio

    def observe_step(self, model_id: str, terms: tuple[int, int, int], measured_s: float) -> None:
        """One step with these cost terms (decodes, their context, prefill tokens) took
        `measured_s`: `observe` with its prediction."""
        self.observe(model_id, self.step_time(model_id, *terms), measured_s, with_prefill=terms[2] > 0)

    def _add_residual(self, model_id: str, residual: float) -> None:
        window = self._residuals.setdefault(model_id, deque(maxlen=self.margin_window))
        window.append(residual)
        if len(window) == 1:
            upper = window[0]
        else:
            upper = statistics.quantiles(window, n=100, method="inclusive")[round(100 * self.margin_quantile) - 1]
        # Within float noise of 1 (a measured duration is a difference of clock readings) the
        # estimates are exact: no margin, and plans stay exactly as without one.
        self._margin[model_id] = upper if upper > 1.0 + EXACT_TOLERANCE else 1.0

    def prefill_margin(self, model_id: str) -> float:
        """How much longer than `prefill_time` a prefill of this model likely runs (>= 1): the
        upper quantile of its recent prefill steps' residuals; 1 before any was measured."""
        return self._margin.get(model_id, 1.0)

    def step_time(self, model_id: str, num_decodes: int, num_context_tokens: int, num_prefill_tokens: int) -> float:
        """The uncorrected prediction for a step that decodes `num_decodes` sequences and
        prefills `num_prefill_tokens` tokens, priced as the simulator charges it
        (prism.sched.cost.step_seconds: a mixed step is one pass over all its tokens). Adding
        a decode step and a prefill would count the weights' pass twice, and the correction
        learnt from mixed steps would then shrink every estimate."""
        return step_seconds(self.base, model_id, num_decodes, num_context_tokens, num_prefill_tokens)

    def step_estimate(self, model_id: str, num_decodes: int, num_context_tokens: int, num_prefill_tokens: int) -> float:
        """`step_time`, corrected by what this device's steps measured."""
        return self.step_time(model_id, num_decodes, num_context_tokens, num_prefill_tokens) * self._f(model_id)

    def _f(self, model_id: str) -> float:
        return self.factor.get(model_id, 1.0)

    def prefill_time(self, model_id: str, num_tokens: int) -> float:
        return self.base.prefill_time(model_id, num_tokens) * self._f(model_id)

    def decode_step_time(self, model_id: str, batch_size: int, num_context_tokens: int) -> float:
        return self.base.decode_step_time(model_id, batch_size, num_context_tokens) * self._f(model_id)

    def activation_time(self, model_id: str) -> float:
        return self.base.activation_time(model_id)
