"""Typed messages between a frontend and a device worker process (msgpack via msgspec;
never pickle on a socket). Tagged unions, so each side decodes exactly one known type."""
from __future__ import annotations

import msgspec

from prism.types import SamplingParams, TokenLogprobs


# ---- to the worker -------------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag="add", frozen=True):
    req_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams = SamplingParams()  # validated again when decoded
    ttft_slo_s: float | None = None  # None: the model's default
    tpot_slo_s: float | None = None
    priority: int = 0
    # Seconds since the frontend received the request, as of sending this message: the device
    # dates the request from (when this reached it - age), so deadlines count from the
    # client's view, not from when the device got round to reading it. An age, not a
    # timestamp: clocks of different nodes differ, durations do not. 0: unknown (older senders).
    age_s: float = 0.0


class Abort(msgspec.Struct, tag="abort", frozen=True):
    req_id: str


class Evict(msgspec.Struct, tag="evict", frozen=True):
    model: str
    mode: str = "preempt"  # or "drain"


class Activate(msgspec.Struct, tag="activate", frozen=True):
    model: str


class DropHostCopy(msgspec.Struct, tag="drophost", frozen=True):
    """Free the host copy of a model's weights (its node is over its host-memory budget)."""

    model: str


class SetKVCap(msgspec.Struct, tag="kvcap", frozen=True):
    model: str
    max_pages: int | None  # None: no cap (KV shared elastically)


class ReportMemory(msgspec.Struct, tag="report", frozen=True):
    pass


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


ToWorker = AddRequest | Abort | Evict | Activate | DropHostCopy | SetKVCap | ReportMemory | Shutdown


# ---- from the worker -----------------------------------------------------------------------
class ModelInfo(msgspec.Struct, frozen=True):
    name: str
    max_model_len: int
    vocab_size: int
    weight_bytes: int
    kv_bytes_per_token: int
    resident: bool
    # KV comes in page groups: this many physical pages hold this many tokens of every layer
    # (what a KV share in pages holds, ClusterControl's static partition check)
    pages_per_kv_page: int = 0
    tokens_per_kv_page: int = 0


class Ready(msgspec.Struct, tag="ready", frozen=True):
    device: str
    models: list[ModelInfo]


class Failed(msgspec.Struct, tag="failed", frozen=True):
    message: str  # the worker could not start (bad model, no memory): one line for the user


class Token(msgspec.Struct, frozen=True, array_like=True):
    """A sampled token. Ids only: the frontend detokenizes, and times tokens as they reach it."""

    req_id: str
    token_id: int
    logprobs: TokenLogprobs | None = None  # when the request asked for them


class Tokens(msgspec.Struct, tag="tokens", frozen=True):
    tokens: list[Token]


class Finished(msgspec.Struct, tag="finished", frozen=True):
    """A request is done; its tokens came as Token messages before this one."""

    req_id: str
    finish_reason: str


class Activated(msgspec.Struct, tag="activated", frozen=True):
    """A model's weights are on the device again (sent when it happens, whoever decided it)."""

    model: str


class Evicted(msgspec.Struct, tag="evicted", frozen=True):
    """A model's weights and KV left the device; its running requests wait to be recomputed."""

    model: str
    num_preempted: int


class Rejected(msgspec.Struct, tag="rejected", frozen=True):
    req_id: str
    message: str  # why the request cannot be served (bad input): safe to show the user


class ModelMemory(msgspec.Struct, frozen=True):
    """One model on one device: its pages, its queues, and its counters so far."""

    resident: bool
    weight_pages: int
    kv_pages: int
    running: int
    waiting: int
    activations: int
    evictions: int
    preemptions: int


class DeviceMemory(msgspec.Struct, frozen=True):
    """A device's memory as of `time` (its clock). Field order is the JSON order of the
    memory logs (msgspec.to_builtins keeps it), which prism.bench.plots reads."""

    time: float
    device: str
    page_size: int
    budget_pages: int
    free_pages: int
    models: dict[str, ModelMemory]
    # Models whose weights this device can copy in from host memory, and where that memory
    # is: "" a copy private to this worker, else the store the workers of a node share (one
    # copy per node, however many of its workers list it).
    host_copies: list[str] = []
    host_store: str = ""


class MemoryReport(msgspec.Struct, tag="memory", frozen=True):
    report: DeviceMemory


FromWorker = Ready | Failed | Tokens | Finished | Activated | Evicted | Rejected | MemoryReport
