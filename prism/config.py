"""Frozen configuration: what a model is, how an engine runs it, what a device offers.

Facts discovered at run time (pages free, measured rates) live in state objects, never here.
"""
from __future__ import annotations

import functools
import json
import operator
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin, get_type_hints

import annotated_types as at
from pydantic import BeforeValidator, Field

from prism.errors import UserError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


class ConfigError(UserError):
    """A configuration a user gave us is wrong; the message names what and where."""


SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
              "g": 1 << 30, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '2g', '1000000' -> bytes (one parser for sizes everywhere)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise ConfigError(f"not a size: {text!r} (try 4GiB or 512MiB)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


def size_bytes(value) -> int:
    """A size in bytes from an int or a string such as "4GiB"."""
    return value if isinstance(value, int) else parse_size(str(value))


# Field types with their constraints: the runtime dataclasses below are also the YAML schema
# (prism/cluster/config.py validates them through pydantic; plain construction stays unchecked
# by pydantic, __post_init__ keeps the checks code relies on).
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Size = Annotated[int, BeforeValidator(size_bytes), Field(gt=0)]  # bytes, or "4GiB", "512MiB" in YAML
Kernels = Literal["auto", "triton", "reference"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
ToolParser = Literal["auto", "hermes", "llama3_json"]  # auto: told by the chat template


_BOUNDS = ((at.Gt, "gt", operator.gt, ">"), (at.Ge, "ge", operator.ge, ">="),
           (at.Lt, "lt", operator.lt, "<"), (at.Le, "le", operator.le, "<="))


def _field_rule(tp):
    """(None allowed, Literal values or None, [(op, bound, symbol)]) of a field's annotation."""
    args = get_args(tp)
    none_ok = get_origin(tp) in (Union, UnionType) and type(None) in args
    if none_ok:
        tp = next(a for a in args if a is not type(None))
    bounds = []
    if get_origin(tp) is Annotated:
        for meta in tp.__metadata__:
            for c in getattr(meta, "metadata", [meta]):
                bounds += [(op, getattr(c, attr), sym) for kind, attr, op, sym in _BOUNDS if isinstance(c, kind)]
        tp = get_args(tp)[0]
    if isinstance(tp, type) and issubclass(tp, Enum):
        return none_ok, tuple(tp), bounds
    return none_ok, (get_args(tp) if get_origin(tp) is Literal else None), bounds


@functools.cache
def _field_rules(cls) -> tuple:
    hints = get_type_hints(cls, include_extras=True)
    return tuple((f.name, *_field_rule(hints[f.name])) for f in fields(cls))


def check_fields(obj) -> None:
    """ConfigError unless a config dataclass's values keep the bounds and choices its field
    types declare: the rules its YAML is validated by (pydantic), applied to code that builds
    one directly. Patterns and sizes are left to the YAML side."""
    for name, none_ok, choices, bounds in _field_rules(type(obj)):
        value = getattr(obj, name)
        if value is None and none_ok:
            continue
        if choices is not None and value not in choices:
            shown = ", ".join(str(getattr(c, "value", c)) for c in choices)
            raise ConfigError(f"{type(obj).__name__}.{name} must be one of {shown}, not {value!r}")
        if choices and isinstance(choices[0], Enum) and not isinstance(value, Enum):
            object.__setattr__(obj, name, type(choices[0])(value))  # "fcfs" -> LocalPolicy.FCFS
        for op, bound, sym in bounds:
            if not op(value, bound):
                raise ConfigError(f"{type(obj).__name__}.{name} must be {sym} {bound}, not {value!r}")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (rope_type "llama3"); other types are refused."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """The shape of one Llama-family model, read from a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k and v projections (always for Qwen2)
    attention_out_bias: bool = False  # bias on o_proj too (Llama/Qwen3 with attention_bias)
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_size: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_size

    def num_params(self) -> int:
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.attention_out_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * self.head_dim
        per_layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers * per_layer + embed + h

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(raw, source=str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: unsupported architecture {arch!r}; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        try:
            num_heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            max_pos = int(raw.get("max_position_embeddings", 4096))
            if arch == "MistralForCausalLM" and raw.get("sliding_window"):
                # We do not implement sliding-window attention; within the window it is
                # identical to full attention, so cap the context there instead of being wrong.
                max_pos = min(max_pos, int(raw["sliding_window"]))
            return cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=int(raw.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_value(raw, "rope_theta", 10000.0)),
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                # As transformers builds them: Qwen2 always has q/k/v biases and never an
                # o_proj bias, Mistral ignores attention_bias, Llama and Qwen3 put it on all four.
                attention_bias=arch == "Qwen2ForCausalLM"
                or (arch != "MistralForCausalLM" and bool(raw.get("attention_bias", False))),
                attention_out_bias=arch in ("LlamaForCausalLM", "Qwen3ForCausalLM")
                and bool(raw.get("attention_bias", False)),
                qk_norm=arch == "Qwen3ForCausalLM",
                rope_scaling=_parse_rope_scaling(raw, source),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: bad value: {e}") from None


def _rope_value(raw: dict, key: str, default):
    # transformers 5 writes rope settings under "rope_parameters"; hub files use top-level keys.
    params = raw.get("rope_parameters") or {}
    return raw.get(key, params.get(key, default))


def _parse_rope_scaling(raw: dict, source: str) -> RopeScaling | None:
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ConfigError(f"{source}: unsupported rope scaling type {rope_type!r} (only llama3)")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


@dataclass(frozen=True)
class EngineConfig:
    """How one model's engine batches work."""

    block_size: PosInt = 16  # tokens per KV block
    max_num_seqs: PosInt = 64  # running requests at once
    max_num_batched_tokens: PosInt = 2048  # per-step token budget (chunked prefill)
    # defaults to the model's max_position_embeddings
    max_model_len: Annotated[int, Field(ge=2)] | None = None
    kernels: Kernels = "auto"  # auto (Triton on CUDA), triton or reference (plain PyTorch)
    cuda_graph_max_batch: NonNegInt = 256  # decode batches up to this run as CUDA graphs; 0: never
    # Steps with prefill tokens, up to this many tokens, run as piecewise CUDA graphs
    # (attention eager between the pieces, engine/piecewise_graphs.py); 0: never.
    mixed_graph_max_tokens: NonNegInt = 256
    # Build and launch the next step while the device runs this one, reading its tokens one
    # step late (engine/core.py); off: each step waits for its tokens before the next is built.
    overlap: bool = True
    # Run this model's steps on a CUDA stream of its own (its graphs in a memory pool of their
    # own), so that the steps of a device's models can compute at the same time.
    own_stream: bool = False

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class DeviceConfig:
    """One device and its physical page budget."""

    # "cpu" or "cuda:N"; cpu:N: separate host budgets
    device: Annotated[str, Field(pattern=r"^(cpu(:\d+)?|cuda:\d+)$")] = "cpu"
    memory_bytes: Size = 4 << 30  # the page budget shared by all arenas of this device
    page_size: Size = 2 << 20  # 2 MiB: the CUDA VMM granularity; the CPU backend accepts smaller
    num_spare_pages: NonNegInt = 4  # kept mapped-ready to hide create/map latency
    # The machine it is on ("": this host, single-host mode). Device names repeat across
    # machines (every node has a cuda:0), so a device on a named node is "node/device".
    node: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]*$")] = ""

    @property
    def device_id(self) -> str:
        """The name the cluster knows it by: unique across nodes."""
        return f"{self.node}/{self.device}" if self.node else self.device

    @property
    def num_pages(self) -> int:
        return self.memory_bytes // self.page_size

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class NodeConfig:
    """One machine of a cluster: its name and the host memory it gives to weight copies."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]*$")]
    # Host copies of evicted models' weights (for a fast reactivation) within this budget;
    # None: no limit beyond the machine's own memory.
    host_memory_bytes: Size | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A model as an operator names it: where its weights come from and its latency targets."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$")]  # the id clients use
    # catalog name, HF folder, .gguf file or config.json (see catalog.resolve_model)
    source: Annotated[str, Field(min_length=1)]
    ttft_slo_s: PosFloat = 2.0  # YAML: ttft_slo_ms
    tpot_slo_s: PosFloat = 0.2  # YAML: tpot_slo_ms
    dtype: DType = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    tool_parser: ToolParser = "auto"  # the format of the model's tool calls (docs/api.md)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):
        try:
            check_fields(self)
        except ConfigError as e:
            raise ConfigError(f"model {self.name}: {e}") from None
