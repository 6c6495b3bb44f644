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


def test_the_launch_fit_recovers_the_terms_a_log_was_made_with(tmp_path):
    """Steps of two models (28 and 16 layers, graph cap 256) whose wall time is 0.5 ms + 20 us
    per sequence + 150 us per layer with prefill tokens + 250 us more per layer beyond the cap,
    with a deterministic +-0.1 ms wobble; an activation step (2 s) is left out."""
    models = {"qwen2.5-7b": (28, 256), "llama-3.2-1b": (16, 256)}
    truth = step_log.LaunchFit(0.5e-3, 20e-6, 150e-6, 250e-6, 0)
    steps, t = [], 0.0
    for i in range(400):
        model = "qwen2.5-7b" if i % 3 else "llama-3.2-1b"
        seqs = 1 + i % 9
        prefill = (0, 0, 100, 900)[i % 4]
        terms = (seqs - (prefill > 0), 1000, prefill)
        x = step_log.launch_features(seqs, list(terms), *models[model])
        wall = sum(c * f for c, f in zip((truth.step_s, truth.seq_s, truth.prefill_layer_s, truth.eager_layer_s), x))
        s = step(t, model, terms, wall + (1e-4 if i % 2 else -1e-4))
        s["seqs"] = seqs
        steps.append(s)
        t += 0.05
    steps.append(dict(step(t, "qwen2.5-7b", (0, 0, 10), 2.0, activations=1), seqs=1))
    fit = step_log.fit_launch([write_log(tmp_path / "steps-a.jsonl", steps)], models)
    assert fit.num_steps == 400
    for got, want in ((fit.step_s, truth.step_s), (fit.seq_s, truth.seq_s),
                      (fit.prefill_layer_s, truth.prefill_layer_s), (fit.eager_layer_s, truth.eager_layer_s)):
        assert got == pytest.approx(want, rel=0.1, abs=2e-6)
    host = fit.host(HostOverheads())
    assert host.one_host_thread
    assert host.launch_time(4, 904, 900, 28, 256) == pytest.approx(0.5e-3 + 80e-6 + 28 * 400e-6, rel=0.1)
    assert host.launch_time(4, 104, 100, 28, 256) == pytest.approx(0.5e-3 + 80e-6 + 28 * 150e-6, rel=0.1)


def test_a_launch_term_the_log_does_not_support_is_dropped_not_negative(tmp_path):
    """Wall time falls with the sequences here (nothing real does that): the fit keeps that
    coefficient at 0 rather than charging a negative launch time."""
    models = {"qwen2.5-7b": (28, 256)}
    steps = [dict(step(0.01 * i, "qwen2.5-7b", (i % 5, 100, 0), 1e-3 - 1e-5 * (i % 5 + 1)), seqs=i % 5 + 1)
             for i in range(50)]
    fit = step_log.fit_launch([write_log(tmp_path / "steps-a.jsonl", steps)], models)
    assert fit.seq_s == 0.0 and fit.step_s > 0
