"""The fused layer kernels (norms, SiLU-and-mul, RoPE + KV store) against ReferenceOps, and a
whole model on the Triton kernels against the reference path."""
import pytest
import torch

pytest.importorskip("triton")

from prism.config import ModelConfig  # noqa: E402
from prism.engine.attention import AttentionMetadata  # noqa: E402
from prism.engine.llama import RotaryEmbedding  # noqa: E402
from prism.engine.ops import ReferenceOps, TritonOps  # noqa: E402

from test_decode_attention import DEVICE, DTYPES, TOL, rel_err  # noqa: E402


def rand(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 24, 4096])
def test_norms_and_silu_match_reference(dtype, width):
    ref, fast = ReferenceOps(), TritonOps()
    x, res, w = rand(5, width, dtype=dtype), rand(5, width, dtype=dtype, seed=1), rand(width, dtype=dtype, seed=2)
    assert rel_err(fast.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)) < TOL[dtype]
    want_norm, want_res = ref.add_rms_norm(x, res.clone(), w, 1e-6)
    got_norm, got_res = fast.add_rms_norm(x, res.clone(), w, 1e-6)
    assert rel_err(got_res, want_res) < TOL[dtype] and rel_err(got_norm, want_norm) < TOL[dtype]
    gate_up = rand(3, 2 * width, dtype=dtype, seed=3)
    assert rel_err(fast.silu_and_mul(gate_up), ref.silu_and_mul(gate_up)) < TOL[dtype]


class _Layer:
    def __init__(self, config, rotary, q_norm=None, k_norm=None):
        self.config, self.rotary, self.q_norm, self.k_norm = config, rotary, q_norm, k_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,qk_norm", [(32, False), (24, True)])
def test_rope_and_kv_store_match_reference(dtype, head_dim, qk_norm):
    config = ModelConfig(
        architecture="Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM", vocab_size=64,
        hidden_size=4 * head_dim, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
        head_dim=head_dim, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        qk_norm=qk_norm,
    )
    rotary = RotaryEmbedding(config, 256, torch.device(DEVICE))
    norms = (rand(head_dim, dtype=dtype, seed=7), rand(head_dim, dtype=dtype, seed=8)) if qk_norm else (None, None)
    layer = _Layer(config, rotary, *norms)
    tokens = 6
    qkv = rand(tokens, (4 + 2 * 2) * head_dim, dtype=dtype)
    positions = torch.tensor([0, 1, 2, 50, 51, 200], device=DEVICE)
    slots = torch.tensor([0, 1, 2, 9, 10, -1], device=DEVICE)  # -1: a padding row, stores nothing
    meta = AttentionMetadata(slot_mapping=slots, block_tables=None, context_lens=None, query_start_loc=None,
                             query_lens_host=[], context_lens_host=[], block_tables_host=[],
                             block_size=4, blocks_per_page=2)
    caches = [torch.zeros(3, 8, 2, head_dim, dtype=dtype, device=DEVICE) for _ in range(4)]
    q_ref = ReferenceOps().qkv_to_cache(qkv[:5], positions[:5], _sliced(meta, 5), caches[0], caches[1], layer)
    q_fast = TritonOps().qkv_to_cache(qkv, positions, meta, caches[2], caches[3], layer)
    assert rel_err(q_fast[:5], q_ref) < TOL[dtype]
    assert rel_err(caches[2], caches[0]) < TOL[dtype] and rel_err(caches[3], caches[1]) < TOL[dtype]


def _sliced(meta: AttentionMetadata, n: int) -> AttentionMetadata:
    from dataclasses import replace

    return replace(meta, slot_mapping=meta.slot_mapping[:n])
