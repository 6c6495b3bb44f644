"""The Triton GEMM against torch's matmul on fresh random inputs: ragged shapes, split-K, the
residual and bias epilogues; the config table; and the GPU benchmark script's CPU smoke run.

Without CUDA the kernel runs in Triton's interpreter on CPU tensors (slow: shapes are tiny,
with tiles small enough that every shape spans several tiles and K steps)."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
pytest.importorskip("triton")

from prism.kernels.gemm import ConfigTable, GemmConfig, _counters, default_config, linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative Frobenius error: float32 sums are exact to rounding; bf16/fp16 outputs round once
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SPLIT = GemmConfig(16, 32, 32, split_k=3)  # 3 pieces over K's tiles, the last one shorter
PLAIN = GemmConfig(16, 32, 64)

_seed = iter(range(1000, 10**6))


def rand(*shape, dtype, scale=1.0):
    """Fresh random numbers for every tensor (each call its own seed)."""
    gen = torch.Generator().manual_seed(next(_seed))
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def reference(x, w, residual=None, bias=None):
    """F.linear in float64, rounded to the model dtype, then the residual added as the
    engine adds it (in the model dtype)."""
    y = F.linear(x.double(), w.double(), None if bias is None else bias.double()).to(x.dtype)
    return y if residual is None else residual + y


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,config", [
    (1, 96, 256, SPLIT),       # decode row, split-K
    (37, 80, 200, PLAIN),      # ragged M, N and K (K not a multiple of the tile)
    (37, 80, 200, SPLIT),      # ragged everything, split-K with a masked last K tile
    (5, 64, 512, None),        # the default config
])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_torch(dtype, m, n, k, config, with_residual):
    x, w = rand(m, k, dtype=dtype), rand(n, k, dtype=dtype, scale=k ** -0.5)
    residual = rand(m, n, dtype=dtype) if with_residual else None
    out = linear(x, w, residual, config, out=poisoned(m, n, dtype=dtype))
    assert out.shape == (m, n) and out.dtype == dtype
    assert torch.isfinite(out).all()  # every element written
    assert rel_err(out, reference(x, w, residual)) < TOL[dtype]


def test_bias_residual_in_place_and_leading_dims():
    dtype = torch.bfloat16
    x, w, bias = rand(2, 3, 160, dtype=dtype), rand(48, 160, dtype=dtype, scale=0.1), rand(48, dtype=dtype)
    h = rand(2, 3, 48, dtype=dtype)
    want = reference(x, w, h, bias)
    out = linear(x, w, h, SPLIT, bias=bias, out=h)  # the residual stream updated in place
    assert out is h and rel_err(h, want) < TOL[dtype]


def test_split_k_is_deterministic_and_leaves_its_counters_at_zero():
    x, w = rand(3, 320, dtype=torch.float32), rand(64, 320, dtype=torch.float32)
    first = linear(x, w, config=GemmConfig(16, 32, 32, split_k=4))
    again = linear(x, w, config=GemmConfig(16, 32, 32, split_k=4))
    assert torch.equal(first, again)
    assert not _counters(x.device, 1).any()
    unsplit = linear(x, w, config=GemmConfig(16, 32, 32, split_k=1))
    assert rel_err(first, unsplit) < TOL[torch.float32]


def test_rejects_mismatched_operands():
    x, w = rand(2, 64, dtype=torch.float32), rand(32, 48, dtype=torch.float32)
    with pytest.raises(ValueError, match="features"):
        linear(x, w)
    with pytest.raises(ValueError, match="residual"):
        linear(x, rand(32, 64, dtype=torch.float32), residual=rand(2, 31, dtype=torch.float32))


def test_default_config_splits_k_for_few_rows_only():
    decode = default_config(1, 6144, 4096, sms=132)  # Llama-3.1-8B qkv at batch 1
    tiles, k_tiles = 6144 // decode.block_n, 4096 // decode.block_k
    assert decode.split_k > 1 and 132 <= tiles * decode.split_k <= 4 * 132 and k_tiles // decode.split_k >= 4
    assert default_config(512, 6144, 4096, sms=132).split_k == 1


def test_config_strings_round_trip():
    config = GemmConfig(16, 64, 256, split_k=4, num_warps=8, num_stages=5)
    assert GemmConfig.parse(str(config)) == config
    with pytest.raises(ValueError):
        GemmConfig.parse("m16n64")


def test_config_table_picks_triton_only_where_it_won():
    cases = [
        dict(n=6144, k=4096, m=1, cublas_us=20.0, best_us=15.0, best_config="m16n64k128s4w4p4"),
        dict(n=6144, k=4096, m=64, cublas_us=20.0, best_us=19.5, best_config="m64n64k128s1w4p4"),
        dict(n=6144, k=4096, m=256, cublas_us=50.0, best_us=40.0, best_config="m128n128k64s1w8p3"),
    ]
    table = ConfigTable.from_cases(cases)
    assert table.lookup(1, 6144, 4096) == GemmConfig.parse("m16n64k128s4w4p4")
    assert table.lookup(30, 6144, 4096) is None  # within 5% at 64 rows: cuBLAS
    assert table.lookup(200, 6144, 4096) == GemmConfig.parse("m128n128k64s1w8p3")
    assert table.lookup(1000, 6144, 4096) is None and table.lookup(1, 4096, 4096) is None


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 100])
def test_real_shape_on_gpu(m):
    dtype = torch.bfloat16
    x, w, h = rand(m, 4096, dtype=dtype), rand(6144, 4096, dtype=dtype, scale=4096 ** -0.5), rand(m, 6144, dtype=dtype)
    assert rel_err(linear(x, w, h), reference(x, w, h)) < TOL[dtype]


def test_benchmark_script_smoke(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import gemm_shapes

    out = tmp_path / "gemm.json"
    result = gemm_shapes.main(["--smoke", "--out", str(out)])
    assert out.exists() and result["cases"]
    for case in result["cases"]:
        assert case["cublas_us"] > 0 and case["floor_us"] > 0
        assert case["best_config"] is not None and case["max_rel_err"] < TOL[torch.bfloat16]
    assert any(case["residual"] for case in result["cases"])
