"""benchmarks/engine.py's decode ceilings: bytes only, and per operation (the GEMMs at the
slower of their bytes and their FLOPs)."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from engine import decode_ceilings, layer_params  # noqa: E402

# qwen2.5-7b's shape, an H100's measured rates (benchmarks/results/h100-engine-2026-12-06/)
QWEN = SimpleNamespace(hidden_size=3584, q_size=3584, kv_size=512, intermediate_size=18944,
                       num_layers=28, vocab_size=152064)
WEIGHTS, KV_PER_TOKEN = 15.23e9, 57344
BANDWIDTH, RATE = 3.01e12, 791e12


def ceilings(batch: int, context: int = 1024) -> tuple[float, float]:
    return decode_ceilings(QWEN, WEIGHTS, batch * (context + 1) * KV_PER_TOKEN, batch, BANDWIDTH, RATE)


def test_while_the_gemms_are_bound_by_bytes_both_ceilings_agree():
    for batch in (1, 64, 256):
        by_bytes, per_op = ceilings(batch)
        assert per_op == pytest.approx(by_bytes, rel=0.02)


def test_at_a_large_batch_the_gemms_are_bound_by_flops():
    by_bytes, per_op = ceilings(1024)
    flops = 2 * 1024 * (28 * layer_params(QWEN) + 3584 * 152064)
    assert flops == pytest.approx(14.5e12, rel=0.01)
    assert per_op == pytest.approx(1024 * 1025 * KV_PER_TOKEN / BANDWIDTH + flops / RATE)
    assert per_op > 1.5 * by_bytes
