"""Cost estimates that learn from the device: a per-model correction of any CostModel.

The worker reports, after every step, what the step was predicted to cost and what it took;
the correction is an exponentially weighted mean of measured / predicted, so estimates from
a nominal device (or an old profile) converge on what this process really achieves.
"""
from __future__ import annotations

from prism.sched.cost import step_seconds
from prism.sched.view import CostModel


class CalibratedCost:
    def __init__(self, base: CostModel, alpha: float = 0.2, bounds: tuple[float, float] = (0.02, 50.0)):
        self.base = base
        self.alpha = alpha
        self.bounds = bounds
        self.factor: dict[str, float] = {}

    def observe(self, model_id: str, predicted_s: float, measured_s: float) -> None:
        """One step's prediction and measurement (ignored when either is not positive, e.g.
        under a manual clock that does not move during a step)."""
        if predicted_s <= 0 or measured_s <= 0:
            return
        lo, hi = self.bounds
        ratio = min(max(measured_s / predicted_s, lo), hi)
        old = self.factor.get(model_id)
        self.factor[model_id] = ratio if old is None else (1 - self.alpha) * old + self.alpha * ratio

    def step_time(self, model_id: str, num_decodes: int, num_context_tokens: int, num_prefill_tokens: int) -> float:
        """The uncorrected prediction for a step that decodes `num_decodes` sequences and
        prefills `num_prefill_tokens` tokens, priced as the simulator charges it
        (prism.sched.cost.step_seconds: a mixed step is one pass over all its tokens). Adding
        a decode step and a prefill would count the weights' pass twice, and the correction
        learnt from mixed steps would then shrink every estimate."""
        return step_seconds(self.base, model_id, num_decodes, num_context_tokens, num_prefill_tokens)

    def _f(self, model_id: str) -> float:
        return self.factor.get(model_id, 1.0)

    def prefill_time(self, model_id: str, num_tokens: int) -> float:
        return self.base.prefill_time(model_id, num_tokens) * self._f(model_id)

    def decode_step_time(self, model_id: str, batch_size: int, num_context_tokens: int) -> float:
        return self.base.decode_step_time(model_id, batch_size, num_context_tokens) * self._f(model_id)

    def activation_time(self, model_id: str) -> float:
        return self.base.activation_time(model_id)
