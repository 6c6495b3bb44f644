"""benchmarks/step_log.py's fits on step logs written here: the cold-shape cost of a fresh
server, the request latency outside the worker's steps, and activation steps left out."""
import json
import sys
from pathlib import Path

import pytest

from prism.bench.records import RequestRecord
from prism.sched.cost import ProfileCostModel
from prism.sim.costs import HostOverheads

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import step_log  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "h100-6models.yaml"


def write_log(path: Path, steps: list[dict]) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in steps))
    return path


def step(t, model, terms, wall_s, activations=0):
    return {"t": t, "wall_s": wall_s, "model": model, "terms": list(terms), "seqs": 1, "running": 1,
            "waiting": 0, "activations": activations}


def test_cold_shape_cost_is_first_step_of_a_class_less_a_repeat(tmp_path):
    """Prefills of 100, 120 (same class) and 300 tokens, twice each per server: the first of
    a class takes 12 ms more. Decodes and other servers' logs do not confuse the fit; models
    of one shape (llama-3.2-3b and -3b-b) share their classes."""
    cost = step_log.cost_model(str(CONFIG), step_log.ProfileSet({}, {}))
    keys = step_log.shape_keys(str(CONFIG))
    assert keys["llama-3.2-3b"] == keys["llama-3.2-3b-b"] != keys["qwen2.5-7b"]

    def server(path):
        steps, t = [], 0.0
        for model, n, cold in [("qwen2.5-7b", 100, True), ("qwen2.5-7b", 120, False), ("qwen2.5-7b", 300, True),
                               ("llama-3.2-3b", 300, True), ("llama-3.2-3b-b", 290, False), ("qwen2.5-7b", 290, False)]:
            wall = cost.prefill_time(model, n) + 0.001 + (0.012 if cold else 0.0)
            steps += [step(t, model, (0, 0, n), wall), step(t + 0.1, model, (1, n + 1, 0), 0.5)]
            t += 1.0
        return write_log(path, steps)

    files = [server(tmp_path / "steps-a.jsonl"), server(tmp_path / "steps-b.jsonl")]
    cold_s, num_first, num_repeat = step_log.fit_cold_shapes(files, cost, keys)
    assert (num_first, num_repeat) == (6, 6)
    assert cold_s == pytest.approx(0.012, abs=1e-6)


def test_request_latency_is_ttft_less_the_prefill_step_at_the_clock_offset(tmp_path):
    """Three requests served alone; the log's clock is 100 s ahead of the client's. Each
    spent 6 ms outside its prefill step (whose wall time differs: cold, warm, long prompt);
    a same-shaped step of another request at another time is not taken for theirs."""
    offset = 100.0
    records, steps = [], []
    for i, (send, n, wall) in enumerate([(1.0, 500, 0.040), (3.0, 500, 0.020), (5.0, 2000, 0.060)]):
        first = send + wall + 0.006
        records.append(RequestRecord(i, "qwen2.5-7b", n, 4, send, send, [first + k * 0.01 for k in range(4)],
                                     first + 0.03, "length", 4))
        steps.append(step(offset + send + 0.002, "qwen2.5-7b", (0, 0, n), wall))
    steps.insert(1, step(offset + 2.0, "qwen2.5-7b", (0, 0, 500), 0.5))  # someone else's, alone
    latency, used = step_log.request_latency(records, write_log(tmp_path / "steps.jsonl", steps))
    assert used == 3 and latency == pytest.approx(0.006, abs=1e-9)


def test_steps_that_activated_a_model_are_left_out_of_the_host_fit(tmp_path):
    """A swap step holds a weight copy (hundreds of ms): it would bias the per-step fit."""
    lines = [step(0.01 * i, "m", (1, 100, 0), 0.005) for i in range(5)]
    lines[2] = step(0.02, "m", (1, 100, 0), 0.005, activations=1)
    for later in lines[3:]:
        later["activations"] = 1
    lines.append(step(0.3, "m", (1, 100, 0), 0.005, activations=1))
    log = write_log(tmp_path / "steps.jsonl", lines)
    cost = ProfileCostModel()
    steps = step_log.read_steps([log], cost)
    assert len(steps) == 3  # 4 busy cycles (the last step comes after a pause), less the activation's


def test_solo_calibration_subtracts_the_cold_cost_from_first_of_class_requests():
    """from_solo: with the cold-shape cost given, a request that was the first of its class
    paid it, and what is left is the warm request latency."""
    cost = ProfileCostModel()

    def alone(i, send, n, extra):
        first = send + cost.prefill_time("m", n) + extra
        tokens = [first + k * cost.decode_step_time("m", 1, n + k) for k in range(3)]
        return RequestRecord(i, "m", n, 3, send, send, tokens, tokens[-1], "length", 3)

    records = [alone(0, 0.0, 500, 0.004 + 0.010), alone(1, 10.0, 500, 0.004), alone(2, 20.0, 400, 0.004),
               alone(3, 30.0, 2000, 0.004 + 0.010)]
    with_cold = HostOverheads.from_solo(records, cost, cold_shape_s=0.010)
    without = HostOverheads.from_solo(records, cost)
    assert with_cold.request_s == pytest.approx(0.004, abs=1e-4)
    assert with_cold.cold_shape_s == 0.010
    assert without.request_s > 0.008  # the cold steps' cost taken for request latency
