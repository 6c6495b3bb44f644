"""Two models with different TTFT SLOs under overload, on the real worker with real engines.

Time is virtual (a ManualClock) and every step costs what the cost model says it costs, so
the comparison is exact and repeatable on any machine; the engines really run every step.
"""
from prism.config import DeviceConfig, EngineConfig, ModelSpec
from prism.sched.clock import ManualClock
from prism.sched.local import LocalSchedulerConfig
from prism.types import SamplingParams
from prism.worker.device_worker import DeviceWorker, WorkerConfig

STEP_OVERHEAD_S, PER_TOKEN_S = 0.005, 0.002


class LinearCost:
    """A device where a step costs a fixed overhead plus a fixed time per token."""

    def prefill_time(self, model_id, num_tokens):
        return STEP_OVERHEAD_S + PER_TOKEN_S * num_tokens

    def decode_step_time(self, model_id, batch_size, num_context_tokens):
        return STEP_OVERHEAD_S + PER_TOKEN_S * batch_size

    def activation_time(self, model_id):
        return 0.1


def arrivals():
    """4 s of traffic at about 3x what the device can prefill: loose (TTFT 30 s) requests
    with 150-token prompts every 0.1 s, strict (TTFT 1 s) ones with 20 tokens every 0.4 s."""
    loose = [(0.1 * i, "loose", [5 + (i * 7 + j) % 300 for j in range(150)]) for i in range(40)]
    strict = [(0.05 + 0.4 * i, "strict", [9 + (i * 3 + j) % 300 for j in range(20)]) for i in range(10)]
    return sorted(loose + strict)


def strict_attainment(policy: str) -> tuple[float, float]:
    clock = ManualClock()
    engine = EngineConfig(block_size=8, max_num_batched_tokens=256, max_num_seqs=64)
    models = (
        ModelSpec("loose", "tiny-llama:random", ttft_slo_s=30.0, tpot_slo_s=1.0, engine=engine),
        ModelSpec("strict", "tiny-qwen2:random", ttft_slo_s=1.0, tpot_slo_s=1.0, engine=engine),
    )
    config = WorkerConfig(DeviceConfig("cpu", 256 << 20, 64 << 10), models, LocalSchedulerConfig(policy=policy))
    worker = DeviceWorker(config, clock=clock, cost=LinearCost())
    pending = arrivals()
    done = []
    try:
        while pending or worker.has_unfinished:
            while pending and pending[0][0] <= clock.now():
                _, model, prompt = pending.pop(0)
                worker.add_request(model, prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            if not worker.has_unfinished:
                clock.set(pending[0][0])
                continue
            out = worker.step()
            done += out.finished
            clock.advance(STEP_OVERHEAD_S + PER_TOKEN_S * out.num_tokens)
    finally:
        worker.close()
    assert len(done) == 50  # nothing dropped under either policy
    by_model = {m: [o.metrics["ttft_met"] for mm, o in done if mm == m] for m in ("strict", "loose")}
    return (sum(by_model["strict"]) / len(by_model["strict"]),
            sum(by_model["loose"]) / len(by_model["loose"]))


def test_strict_model_attainment_beats_fcfs_under_overload():
    prism_strict, prism_loose = strict_attainment("prism")
    fcfs_strict, fcfs_loose = strict_attainment("fcfs")
    summary = (f"strict-TTFT model attainment: prism {prism_strict:.0%} vs fcfs {fcfs_strict:.0%} "
               f"(loose model: prism {prism_loose:.0%}, fcfs {fcfs_loose:.0%})")
    print(summary)
    assert prism_strict >= 0.9, summary
    assert prism_strict >= fcfs_strict + 0.5, summary
