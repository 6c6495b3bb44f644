"""Which kernels an engine runs: EngineConfig.kernels, with PRISM_KERNELS overriding "auto"."""
from __future__ import annotations

import pytest
import torch

from prism.engine.ops import make_ops, triton_available

CPU = torch.device("cpu")


def test_auto_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("PRISM_KERNELS", raising=False)
    assert make_ops(CPU, "auto").name == "reference"


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_prism_kernels_overrides_auto_but_not_an_explicit_choice(monkeypatch):
    monkeypatch.setenv("PRISM_KERNELS", "triton")
    assert make_ops(CPU, "auto").name == "triton"
    assert make_ops(CPU, "reference").name == "reference"  # the config said so


def test_a_bad_kernel_set_is_refused(monkeypatch):
    monkeypatch.setenv("PRISM_KERNELS", "cutlass")
    with pytest.raises(ValueError, match="unknown kernel set 'cutlass'"):
        make_ops(CPU, "auto")
