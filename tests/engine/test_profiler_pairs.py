"""Two tiny random models' steps side by side on CPU (prism.engine.pair_profiler), and
`prism profile --pair-with` as a real process. (On CPU streams are a no-op: a turn runs its
steps one after another; what is checked here is what is measured, not how fast.)"""
import os
import subprocess
import sys

import pytest

from prism.config import DeviceConfig, EngineConfig
from prism.engine.llm_engine import LLMEngine
from prism.engine.pair_profiler import StepCase, pair_cases, profile_pair, profile_streams
from prism.sched.concurrency import ContentionRule
from prism.sched.concurrency_profile import CONCURRENCY_FILE, ConcurrencyProfile
from prism.sim.costs import ProfileSet
from prism.types import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4)


@pytest.fixture(scope="module")
def engines():
    """Two models on one page pool, each with a stream of its own (as a worker sets them up)."""
    cfg = EngineConfig(own_stream=True)
    first = LLMEngine("tiny-llama:random", cfg, DeviceConfig("cpu", memory_bytes=256 << 20, page_size=64 << 10))
    second = LLMEngine("tiny-qwen2:random", cfg, pool=first.pool)
    yield first, second
    second.close()
    first.close()


def state(first, second):
    return (first.pool.used_pages, first.blocks.num_mapped_pages, second.blocks.num_mapped_pages,
            first.blocks.num_free_blocks, second.blocks.num_free_blocks)


def test_the_cases_are_decodes_and_prompts_beside_decodes_both_ways():
    cases = pair_cases([(1, 32), (4, 64)], [24], (2, 16))
    assert [(a.label, b.label) for a, b in cases] == [
        ("decode 1x32", "decode 1x32"), ("decode 4x64", "decode 4x64"),
        ("prefill 24", "decode 2x16"), ("decode 2x16", "prefill 24"), ("prefill 24", "prefill 24")]


def test_every_case_that_fits_is_timed_alone_and_side_by_side(engines):
    first, second = engines
    prompt = [[5, 6, 7, 8]]
    tokens = [e.generate(prompt, GREEDY)[0].token_ids for e in engines]
    before = state(first, second)
    cases = pair_cases([(1, 32), (3, 40), (2, 5000)], [24], (2, 16))  # 5000 tokens: past the context
    turns = profile_pair(first, second, cases, repeats=2)
    assert state(first, second) == before
    assert [e.generate(prompt, GREEDY)[0].token_ids for e in engines] == tokens  # still serving, unchanged

    assert [t.case for t in turns] == ["decode 1x32 | decode 1x32", "decode 3x40 | decode 3x40",
                                       "prefill 24 | decode 2x16", "decode 2x16 | prefill 24",
                                       "prefill 24 | prefill 24"]
    for turn in turns:
        assert turn.turn_s > 0 and all(s.alone_s > 0 for s in turn.steps)
        assert [s.model for s in turn.steps] == ["tiny-llama:random", "tiny-qwen2:random"]
        assert [s.weight_bytes for s in turn.steps] == [e.weights.num_bytes for e in engines]
        assert [s.kv_bytes_per_token for s in turn.steps] == [e.config.kv_bytes_per_token(4) for e in engines]
    decode_3x40, prompt_beside = turns[1].steps[0], turns[2].steps
    assert (decode_3x40.num_tokens, decode_3x40.num_context) == (3, 3 * 41)  # the cost terms the simulator charges
    assert [(s.num_tokens, s.num_context) for s in prompt_beside] == [(24, 0), (2, 2 * 17)]


def test_steps_relaunched_at_their_own_pace_are_timed_alone_and_side_by_side(engines):
    first, second = engines
    before = state(first, second)
    cases = pair_cases([(2, 24)], [16], (2, 16))[:2]  # both decoding; a prompt beside a decode batch
    streams = profile_streams(first, second, cases, seconds=0.05)
    assert state(first, second) == before
    assert [m.case for m in streams] == ["decode 2x24 | decode 2x24", "prefill 16 | decode 2x16"]
    for m in streams:
        assert all(s.alone_s > 0 for s in m.steps) and all(t > 0 for t in m.side_s)
        assert [s.model for s in m.steps] == ["tiny-llama:random", "tiny-qwen2:random"]
    # on CPU both run on one thread one after another: side by side each period is about both steps
    m = streams[0]
    assert all(t > 0.5 * min(s.alone_s for s in m.steps) for t in m.side_s)
    with pytest.raises(ValueError, match="seconds"):
        profile_streams(first, second, cases, seconds=0)


def test_busy_engines_and_a_bad_repeat_count_are_refused(engines):
    first, second = engines
    one = [(StepCase(1, 8), StepCase(1, 8))]
    with pytest.raises(ValueError, match="repeats"):
        profile_pair(first, second, one, repeats=0)
    req_id = second.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    try:
        with pytest.raises(RuntimeError, match="idle"):
            profile_pair(first, second, one)
    finally:
        second.abort(req_id)
        second.drain_events()


def test_cli_writes_rates_the_simulator_loads(tmp_path):
    """The same model twice (two names on one pool), the quick grid; the file lands where
    --out says, and a profile folder holding it gives the simulator its rates."""
    code = "import sys; from prism.cli import main; sys.exit(main(['profile'] + sys.argv[1:]))"
    out = tmp_path / CONCURRENCY_FILE
    result = subprocess.run([sys.executable, "-c", code, "--model", "tiny-llama:random", "--pair-with",
                             "tiny-llama:random", "--memory", "256MiB", "--quick", "--repeats", "1",
                             "--streams", "0.02", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout and "fitted" in result.stdout and "contention rule:" in result.stdout
    assert "relaunched at their own pace" in result.stdout
    profile = ConcurrencyProfile.load(out)
    assert set(profile.losses) == set(ContentionRule)  # both rules fitted; the file keeps the better
    assert profile.losses[profile.rule] == min(profile.losses.values())
    assert profile.device == "cpu" and profile.card and profile.date
    assert "--pair-with tiny-llama:random" in profile.command and "--streams 0.02" in profile.command
    assert [m.case for m in profile.streams] == [t.case for t in profile.turns]
    assert [t.case for t in profile.turns][:2] == ["decode 1x128 | decode 1x128", "decode 8x128 | decode 8x128"]
    rates = ProfileSet.load(tmp_path).concurrent_rates("cpu")
    assert (rates.memory_bytes_per_s, rates.flops_per_s) == (profile.memory_bytes_per_s, profile.flops_per_s)
    assert ProfileSet.load(tmp_path).contention_rule("cpu") is profile.rule
