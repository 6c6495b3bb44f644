"""`prism generate` as a user runs it: a real process, real weights, exact greedy text."""
import os
import subprocess
import sys

import pytest

from conftest import transformers_greedy

PROMPT = "The capital of France is"


def run_prism(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "prism.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_generate_prints_transformers_greedy_continuation():
    result = run_prism("generate", "--model", "smollm2-135m", "--prompt", PROMPT,
                       "--max-tokens", "16", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    expected = transformers_greedy(PROMPT, 16)
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--model", "tiny-llama:random", "--max-tokens", "0"], "max_tokens"),
        (["--model", "tiny-llama:random", "--temperature", "-1"], "temperature"),
        (["--model", "tiny-llama:random", "--top-p", "1.5"], "top_p"),
    ],
)
def test_bad_input_gives_one_line_error(args, message):
    result = run_prism("generate", "--prompt", "hi", *args, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prism: error:"), result.stderr
    assert message in lines[0].lower()


def test_corrupt_weight_file_gives_one_line_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    result = run_prism("generate", "--model", str(bad), "--prompt", "hi", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], result.stderr


def test_prompt_longer_than_context_is_refused(tmp_path):
    result = run_prism("generate", "--model", "tiny-llama:random", "--prompt", "word " * 5000,
                       timeout=120)
    assert result.returncode == 2
    assert "context limit" in result.stderr


def test_unknown_architecture_and_missing_weights(tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}')
    result = run_prism("generate", "--model", str(gpt2), "--prompt", "hi", timeout=120)
    assert result.returncode == 2 and "unsupported architecture 'GPT2LMHeadModel'" in result.stderr

    no_weights = tmp_path / "llama"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16,'
        ' "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}')
    result = run_prism("generate", "--model", str(no_weights), "--prompt", "hi", timeout=120)
    assert result.returncode == 2 and "safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
