"""Prism plans a prefill for its likely-worst time, the estimate times the measured spread of
past prefill steps (CalibratedCost.prefill_margin): on a device whose prefill steps often run
longer than estimated, prefills planned just in time would be late; where the estimates are
exact the margin is 1 and changes nothing."""
from prism.config import DeviceConfig, EngineConfig, ModelSpec
from prism.sched.calibration import CalibratedCost
from prism.sched.local import LocalSchedulerConfig
from prism.sim.device import SimDevice
from prism.sim.shapes import model_shape
from prism.types import SamplingParams
from prism.worker.device_core import WorkerConfig

TTFT_S, TPOT_S = 0.15, 0.006


class Planned:
    """What the policy plans with: a prefill grows with its tokens, a decode step (3.4 ms for
    four sequences) with its batch."""

    def prefill_time(self, model_id, num_tokens):
        return 0.004 + 0.0005 * num_tokens

    def decode_step_time(self, model_id, batch_size, num_context_tokens):
        return 0.003 + 0.0001 * batch_size

    def activation_time(self, model_id):
        return 0.05


class SlowPrefills(Planned):
    """The device as planned, except that every other prefill size (by blocks of 16 tokens)
    runs 40% longer than estimated."""

    def prefill_time(self, model_id, num_tokens):
        return super().prefill_time(model_id, num_tokens) * (1.4 if (num_tokens // 16) % 2 else 1.0)


def run(truth, monkeypatch, margin: bool = True) -> tuple[float, SimDevice]:
    """TTFT attainment of model "p" while model "d" decodes with a tight TPOT on the same device."""
    engine = EngineConfig(block_size=16, max_num_batched_tokens=512, max_num_seqs=64)
    models = (ModelSpec("d", "tiny-llama:random", ttft_slo_s=1.0, tpot_slo_s=TPOT_S, engine=engine),
              ModelSpec("p", "tiny-llama:random", ttft_slo_s=TTFT_S, tpot_slo_s=1.0, engine=engine))
    config = WorkerConfig(DeviceConfig("cpu", 1 << 30, 64 << 10), models, LocalSchedulerConfig())
    shapes = {m.name: model_shape(m, "cpu") for m in models}
    with monkeypatch.context() as m:
        if not margin:
            m.setattr(CalibratedCost, "prefill_margin", lambda self, model_id: 1.0)
        dev = SimDevice(config, shapes, truth=truth, policy_profiles={}, policy_cost=Planned())
        for i in range(4):  # long decodes that always want the device within 8 ms
            dev.add_request("d", [5] * 64, SamplingParams(max_tokens=2000, ignore_eos=True), req_id=f"d{i}")
        met = total = 0
        for i in range(40):
            arrival = dev.clock.now()
            dev.add_request("p", [7] * (40 + 16 * (i % 9)), SamplingParams(max_tokens=1, ignore_eos=True),
                            req_id=f"p{i}")
            done = []
            while not done:
                done = [out for model_id, out in dev.step().finished if model_id == "p"]
            met += done[0].metrics["token_times"][0] - arrival <= TTFT_S
            total += 1
    return met / total, dev


def test_a_device_with_slow_prefills_meets_ttft_with_the_measured_margin(monkeypatch):
    without, _ = run(SlowPrefills(), monkeypatch, margin=False)
    with_margin, dev = run(SlowPrefills(), monkeypatch)
    print(f"\nTTFT met: {without:.0%} without the margin, {with_margin:.0%} with it "
          f"(margin {dev.cost.prefill_margin('p'):.2f})")
    # The correction learns the mean of the two kinds of step; the margin covers the slow ones.
    assert dev.cost.prefill_margin("p") > 1.1
    # Without it, a prefill planned just in time is late whenever its step is a slow one; with
    # it, only those before the first slow step was measured can be.
    assert without <= 0.7
    assert with_margin >= 0.9


def test_exact_estimates_leave_no_margin_and_change_nothing(monkeypatch):
    exact, dev = run(Planned(), monkeypatch)
    assert dev.cost.prefill_margin("p") == 1.0 and dev.cost.prefill_margin("d") == 1.0
    assert exact == run(Planned(), monkeypatch, margin=False)[0]
