"""The profiler on a tiny random model on CPU, and `prism profile` as a real process."""
import os
import subprocess
import sys

import pytest

from prism.config import DeviceConfig
from prism.engine.llm_engine import LLMEngine
from prism.engine.profiler import profile_engine
from prism.sched.cost import ModelProfile, ProfileCostModel, default_profile_path
from prism.types import SamplingParams

PREFILL = (16, 64, 5000)  # 5000 is past tiny-llama's 2048-token context: skipped
BATCHES = (1, 3, 100_000)  # 100k sequences do not fit 256 MiB of KV: skipped
CONTEXTS = (32, 100)


@pytest.fixture(scope="module")
def engine():
    eng = LLMEngine("tiny-llama:random",
                    device_config=DeviceConfig("cpu", memory_bytes=256 << 20, page_size=64 << 10))
    yield eng
    eng.close()


def pages(engine):
    return engine.pool.used_pages, engine.blocks.num_mapped_pages, engine.blocks.num_free_blocks


def test_profile_has_every_case_that_fits_and_gives_back_every_page(engine):
    before = pages(engine)
    profile = profile_engine(engine, PREFILL, BATCHES, CONTEXTS, repeats=2)
    assert pages(engine) == before
    assert [n for n, _ in profile.prefill] == [16, 64]
    assert [(b, c) for b, c, _ in profile.decode] == [(1, 32), (1, 100), (3, 32), (3, 100)]
    assert all(t > 0 for _, t in profile.prefill) and all(t > 0 for *_, t in profile.decode)
    assert (profile.model, profile.device, profile.dtype) == ("tiny-llama:random", "cpu", "float32")
    assert profile.weight_bytes == engine.weights.num_bytes
    assert profile.kv_bytes_per_token == engine.config.kv_bytes_per_token(4)
    assert profile.card and profile.date
    cost = ProfileCostModel({"tiny": profile})
    # measured times, made non-decreasing (CPU timings are noisy)
    assert cost.prefill_time("tiny", 64) == pytest.approx(max(t for _, t in profile.prefill))
    assert cost.decode_step_time("tiny", 2, 200) > 0


def test_mixed_steps_are_measured_and_pages_given_back(engine):
    before = pages(engine)
    profile = profile_engine(engine, (16,), (2,), (32,), repeats=1, mixed_cases=[(24, 3, 40), (5000, 1, 8)])
    assert pages(engine) == before
    assert [(p, b, c) for p, b, c, _ in profile.mixed] == [(24, 3, 40)]  # 5000 tokens do not fit
    assert ProfileCostModel({"tiny": profile}).mixed_step_time("tiny", 3, 120, 24) > 0


def test_engine_still_serves_and_keeps_its_spare_pages(engine):
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))[0]
    before = pages(engine)
    assert before[1] >= 1  # a spare KV page stays mapped after a request
    profile_engine(engine, (8,), (2,), (16,), repeats=1)
    assert pages(engine) == before
    again = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))[0]
    assert again.token_ids == out.token_ids


def test_busy_engine_is_refused(engine):
    req_id = engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    try:
        with pytest.raises(RuntimeError, match="idle"):
            profile_engine(engine, (8,), (1,), (8,))
    finally:
        engine.abort(req_id)
        engine.drain_events()


def run_profile_cli(*args, env=None):
    code = "import sys; from prism.cli import main; sys.exit(main(['profile'] + sys.argv[1:]))"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_writes_a_profile_the_cost_model_loads(tmp_path):
    result = run_profile_cli("--model", "tiny-llama:random", "--memory", "256MiB", "--quick",
                             "--repeats", "1", env={"PRISM_PROFILE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    path = default_profile_path(tmp_path, "tiny-llama:random", "cpu")
    assert path.exists() and str(path) in result.stdout
    assert "tokens/s" in result.stdout and "step ms" in result.stdout
    profile = ModelProfile.load(path)
    assert profile.prefill and profile.decode
    cost = ProfileCostModel({"tiny": profile})
    assert cost.prefill_time("tiny", 100) > 0 and cost.decode_step_time("tiny", 4, 1000) > 0


def test_cli_error_is_one_line(tmp_path):
    result = run_profile_cli("--model", "no-such-model", "--out", str(tmp_path / "x.json"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prism: error:"), result.stderr
    assert "unknown model" in lines[0]


@pytest.mark.gpu
def test_overlapped_step_time_is_gpu_or_host_time_and_no_more_than_the_wall():
    """With overlap a step is timed as max(GPU time with the host hidden, host time): never
    above the synchronous wall time of the same step, and never below its host part."""
    from prism.config import EngineConfig
    from prism.engine.profiler import _Session, decode_plan, prefill_all, timed_steps

    times = {}
    for overlap in (False, True):
        eng = LLMEngine("llama-3.2-1b:random", engine_config=EngineConfig(overlap=overlap),
                        device_config=DeviceConfig("cuda:0", memory_bytes=8 << 30))
        session = _Session(eng)
        seqs = [session.new_seq(512) for _ in range(8)]
        for seq in seqs:
            assert eng.blocks.allocate(seq, 512 + 8)
        prefill_all(eng, seqs, 512)
        runs = [timed_steps([eng], [decode_plan(seqs)])[0] for _ in range(6)]
        times[overlap] = sorted(runs)[len(runs) // 2]
        session.free(seqs)
        eng.close()
    assert 0.3 * times[False] < times[True] <= 1.05 * times[False]
