"""Every environment variable Prism reads, in one place (nothing else reads os.environ).

Each is an override of something that also has a flag or a config key, for places where a
flag cannot reach (a worker process, a test's subprocess).
"""
from __future__ import annotations

import os
from pathlib import Path

API_KEY = "PRISM_API_KEY"  # `prism serve --api-key`, and the key `prism demo` sends
PROFILE_DIR = "PRISM_PROFILE_DIR"  # where `prism profile` writes and workers read profiles
KERNELS = "PRISM_KERNELS"  # auto | triton | reference: overrides an engine's "auto" kernels
STEP_LOG = "PRISM_STEP_LOG"  # a folder: each worker writes one JSON line per step there
TRACES_DIR = "PRISM_TRACES_DIR"  # the public traces (azure_llm_2023/, alibaba_gentd26/)
TOKENIZER_CACHE = "PRISM_TOKENIZER_CACHE"  # where GGUF tokenizers exported as HF folders are kept
TRITON_INTERPRET = "TRITON_INTERPRET"  # Triton's own: kernels run on CPU tensors (tests)
# NVLink multicast (NVLS) left on can take a host's GPUs out of service; set in every
# tensor-parallel rank before its process group starts.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _get(name: str) -> str | None:
    return os.environ.get(name) or None


def api_key() -> str | None:
    return _get(API_KEY)


def profile_dir() -> Path:
    """$PRISM_PROFILE_DIR, else $XDG_CACHE_HOME/prism/profiles (~/.cache/prism/profiles)."""
    if _get(PROFILE_DIR):
        return Path(os.environ[PROFILE_DIR]).expanduser()
    return Path(_get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "prism" / "profiles"


def tokenizer_cache_dir() -> Path:
    """$PRISM_TOKENIZER_CACHE, else $XDG_CACHE_HOME/prism/tokenizers (~/.cache/prism/tokenizers)."""
    if _get(TOKENIZER_CACHE):
        return Path(os.environ[TOKENIZER_CACHE]).expanduser()
    return Path(_get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "prism" / "tokenizers"


def kernels() -> str | None:
    return _get(KERNELS)


def step_log_dir() -> str | None:
    return _get(STEP_LOG)


def traces_dir() -> str | None:
    return _get(TRACES_DIR)


def triton_interpret() -> bool:
    return os.environ.get(TRITON_INTERPRET) == "1"


def disable_multicast() -> None:
    os.environ.update(NO_MULTICAST)
