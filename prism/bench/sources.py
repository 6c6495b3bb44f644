"""Loaders for the public request traces in shared/traces (see its README for provenance,
licences and what to cite). Each loader returns the plain trace format of prism.bench.trace:
a list of TraceRequest sorted by arrival, arrival_s in seconds from the trace start.

- Azure LLM inference trace 2023 (Patel et al., Splitwise, ISCA'24; CC-BY-4.0): two services,
  "code" and "conv", each with arrival times and prompt/output token counts.
- Alibaba GenAI many-model trace (Lin et al., SoCC'25; research use): arrivals of requests to
  87 base-model ids (image generation), used for model popularity and per-model burstiness only.

The files are read as they are; nothing under shared/ is written.
"""
from __future__ import annotations

import csv
import random
from collections import Counter
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from prism.bench.trace import TraceError, TraceRequest
from prism.env import traces_dir as traces_env
from prism.errors import UserError

AZURE_FILES = {
    "code": "azure_llm_2023/AzureLLMInferenceTrace_code.csv",
    "conv": "azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
}
ALIBABA_FILE = "alibaba_gentd26/lora_request_trace.csv"
_EPOCH = datetime(1970, 1, 1)  # naive: the traces have no time zone, and no DST shifts apply


class TracesNotFoundError(TraceError):
    """The shared traces folder (or a file in it) is not where we looked."""


def traces_dir() -> Path:
    """The folder holding the public traces: $PRISM_TRACES_DIR if set, else `shared/traces` beside
    the working directory (`../shared/traces`, a checkout's neighbour), else `./shared/traces`."""
    env = traces_env()
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            return path
        raise TracesNotFoundError(f"traces folder not found: PRISM_TRACES_DIR={env} is not a folder")
    candidates = [Path.cwd().parent / "shared" / "traces", Path.cwd() / "shared" / "traces"]
    for path in candidates:
        if path.is_dir():
            return path
    raise TracesNotFoundError(
        "traces folder not found: looked in " + " and ".join(str(p) for p in candidates)
        + " (set PRISM_TRACES_DIR to the folder holding azure_llm_2023/ and alibaba_gentd26/)")


def _trace_file(relative: str) -> Path:
    path = traces_dir() / relative
    if not path.is_file():
        raise TracesNotFoundError(f"trace file not found: {path}")
    return path


def _read_rows(path: Path, columns: list[str]) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")
        return list(reader)


def _parse_time(text: str) -> float:
    """'2023-11-16 18:17:03.9799600' (any number of fraction digits, or none) -> POSIX-like
    seconds (naive wall clock, no time zone; only differences are used). Keeps the 100 ns digits that
    datetime would truncate."""
    whole, _, frac = text.strip().partition(".")
    seconds = (datetime.strptime(whole, "%Y-%m-%d %H:%M:%S") - _EPOCH).total_seconds()
    return seconds + (float("0." + frac) if frac else 0.0)


@lru_cache(maxsize=4)
def _azure_rows(path: Path, mtime: float) -> tuple[tuple[float, int, int], ...]:
    rows = _read_rows(path, ["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
    out = []
    for i, row in enumerate(rows):
        try:
            out.append((_parse_time(row["TIMESTAMP"]), int(row["ContextTokens"]),
                        int(row["GeneratedTokens"])))
        except ValueError as e:
            raise TraceError(f"{path}: row {i + 1}: {e}") from None
    return tuple(sorted(out))


def _azure(kind: str) -> tuple[tuple[float, int, int], ...]:
    if kind not in AZURE_FILES:
        raise UserError(f"unknown Azure trace {kind!r}: choose from {', '.join(AZURE_FILES)}")
    path = _trace_file(AZURE_FILES[kind])
    return _azure_rows(path, path.stat().st_mtime)


def _azure_requests(rows, model: str, t0: float) -> list[TraceRequest]:
    return [TraceRequest(t - t0, model, max(inp, 1), max(out, 1)) for t, inp, out in rows]


def load_azure(kind: str, model: str | None = None) -> list[TraceRequest]:
    """The Azure LLM 2023 trace of one service, `kind` "code" or "conv", all requests named
    `model` (default: the kind). arrival_s counts from the file's first timestamp;
    input_len = ContextTokens, output_len = GeneratedTokens. Rows with 0 generated tokens
    (or 0 context tokens) get 1 instead, since the trace format needs lengths >= 1 (the
    shipped files have none)."""
    rows = _azure(kind)
    if not rows:
        return []
    return _azure_requests(rows, model or kind, rows[0][0])


def load_azure_both(models: tuple[str, str] = ("code", "conv")) -> list[TraceRequest]:
    """Both Azure services as two models on one wall clock (code requests named models[0],
    conv requests models[1]); arrival_s counts from the earlier of the two first timestamps."""
    code, conv = _azure("code"), _azure("conv")
    t0 = min(r[0][0] for r in (code, conv) if r)
    out = _azure_requests(code, models[0], t0) + _azure_requests(conv, models[1], t0)
    return sorted(out, key=lambda r: r.arrival_s)


@lru_cache(maxsize=2)
def _alibaba_rows(path: Path, mtime: float) -> tuple[tuple[float, str], ...]:
    rows = _read_rows(path, ["gmt_create", "checkpoint_model_version_id"])
    out = []
    for i, row in enumerate(rows):
        try:
            out.append((_parse_time(row["gmt_create"]), row["checkpoint_model_version_id"].strip()))
        except ValueError as e:
            raise TraceError(f"{path}: row {i + 1}: {e}") from None
    return tuple(sorted(out))


def _alibaba() -> tuple[tuple[float, str], ...]:
    path = _trace_file(ALIBABA_FILE)
    return _alibaba_rows(path, path.stat().st_mtime)


def alibaba_model_counts() -> Counter:
    """Requests per checkpoint_model_version_id over the whole Alibaba file. The key "" counts
    the rows with no model id (25 PENDING rows in the shipped file; the README's "87 base
    models" counts them as one)."""
    return Counter(model for _, model in _alibaba())


def load_alibaba(num_models: int, model_names: list[str] | None = None, *,
                 jitter_seed: int | None = None) -> list[TraceRequest]:
    """Arrivals of the Alibaba many-model trace, restricted to its `num_models` most popular
    base models (by request count; ties broken by model id; rows without a model id are
    never chosen). The k-th most popular model is renamed model_names[k] (default "m0",
    "m1", ...), so model_names[0] is the busiest.

    The trace is image generation and carries no LLM token counts, so every request gets the
    placeholder input_len=1, output_len=1: fill real lengths with
    prism.bench.transforms.combine (e.g. from the Azure conv trace).

    arrival_s counts from the file's first timestamp (whatever its model), so traces with
    different num_models share one clock. Timestamps have 1 s resolution, so many arrivals
    coincide; with `jitter_seed` set each arrival is moved uniformly within its second
    (seeded), which the data cannot contradict. The whole trace spans 23 days at about
    0.013 requests/s: use transforms.window / scale_time to make a replayable piece."""
    rows = _alibaba()
    counts = Counter(model for _, model in rows if model)
    if not isinstance(num_models, int) or num_models < 1:
        raise UserError(f"num_models must be a positive integer, got {num_models!r}")
    if num_models > len(counts):
        raise UserError(f"the Alibaba trace has {len(counts)} base models with an id, "
                         f"asked for {num_models}")
    if model_names is None:
        model_names = [f"m{k}" for k in range(num_models)]
    if len(model_names) != num_models:
        raise UserError(f"{len(model_names)} model names given for {num_models} models")
    if len(set(model_names)) != len(model_names):
        raise UserError(f"model names must be distinct: {model_names}")
    ranked = sorted(counts, key=lambda m: (-counts[m], m))[:num_models]
    rename = dict(zip(ranked, model_names))
    t0 = rows[0][0]
    rng = random.Random(jitter_seed) if jitter_seed is not None else None
    out = []
    for t, model in rows:
        name = rename.get(model)
        if name is not None:
            offset = rng.random() if rng is not None else 0.0
            out.append(TraceRequest(t - t0 + offset, name, 1, 1))
    return sorted(out, key=lambda r: r.arrival_s)
