"""The router: the frontend's half of serving (implements ServingBackend).

It tokenizes and detokenizes (stop strings included), routes each request to a device
through the global scheduler, streams results back, and every tick refreshes the workers'
memory reports and runs the global scheduler's periodic work (idle eviction, migration).
The workers' lifecycle (starting, restarting, nodes joining and leaving) is the Supervisor's
(prism/server/supervisor.py). Mechanism only: the decisions come from prism.sched.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import msgspec

from prism.cluster.config import ClusterConfig
from prism.cluster.control import TICK_S, ClusterControl, DeviceDown
from prism.cluster.worker_link import Launcher, LocalLauncher, WorkerLink
from prism.config import ConfigError, ModelSpec
from prism.engine.catalog import resolve_model
from prism.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from prism.engine.tokenizer import Tokenizer, load_tokenizer
from prism.server.backend import (GenerationChunk, GenerationRequest, ModelCard, RequestTimedOut, ServerBusy,
                                  UnknownModel, WorkerFailed)
from prism.server.metrics import ServerMetrics
from prism.server.supervisor import Supervisor
from prism.types import RequestError, TokenLogprobs
from prism.worker import messages as msg

log = logging.getLogger("prism.router")


@dataclass
class _Stream:
    """One request in flight, as the frontend tracks it."""

    request: GenerationRequest
    device: str
    detok: IncrementalDetokenizer | None
    stops: StopStringMatcher | None
    arrival: float  # when the HTTP request came in (time.monotonic()): TTFT counts from here
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    num_output: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    done: bool = False


class Router:
    def __init__(self, config: ClusterConfig, launcher: Launcher | None = None):
        grouped = [d for d, n in config.gpus.items() if n > 1]
        if grouped:
            raise ConfigError(f"device {grouped[0]} spans several GPUs (gpus: {config.gpus[grouped[0]]}); "
                              "tensor-parallel groups exist only in the simulator (prism simulate, prism plan)")
        self.config = config
        self.specs = {m.name: m for m in config.models}
        self.links: dict[str, WorkerLink] = {}
        self.launcher = launcher or LocalLauncher(config.devices)
        self.created = int(time.time())
        self._streams: dict[str, _Stream] = {}
        self.metrics = ServerMetrics(self._reports, self._queue_depth, lambda: self.supervisor.topology())
        # Routing, placement and global ticks: shared with the simulator (prism.sim).
        devices = self.launcher.devices()
        self.control = ClusterControl(config, self.links, self._queue_depth, self.metrics.migrations, devices)
        self.supervisor = Supervisor(config, self.launcher, self.links, self.control, self.metrics)
        self._tick_task: asyncio.Task | None = None
        self._closed = False
        self.tokenizers = self._load_tokenizers()  # first: a bad model name fails fast
        try:
            self.supervisor.start_workers(devices)
        except Exception:  # close what did start, then report the failure
            self.close()
            raise

    def _load_tokenizers(self) -> dict[str, Tokenizer | None]:
        out = {}
        for spec in self.config.models:
            source = resolve_model(spec.source)
            out[spec.name] = load_tokenizer(source.tokenizer_path) if source.tokenizer_path else None
        return out

    # ---- start and stop --------------------------------------------------------------------
    async def start(self) -> None:
        """Attach to the running event loop (the HTTP server's), lay the models out over the
        devices, and start ticking."""
        self.supervisor.start(self._on_message)
        self.control.start(time.monotonic())
        self._tick_task = asyncio.create_task(self._ticker())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tick_task is not None:
            self._tick_task.cancel()
        for stream in self._streams.values():
            self._fail(stream, ServerBusy("the server is shutting down"))
        self.supervisor.close()  # its tasks, then every worker and the launcher

    # ---- ServingBackend --------------------------------------------------------------------
    def model_cards(self) -> list[ModelCard]:
        resident = self._residency()
        return [ModelCard(name, self.max_model_len(name), self.created, tuple(resident.get(name, ())))
                for name in self.specs]

    def tokenizer(self, model: str) -> Tokenizer:
        self._check_model(model)
        tok = self.tokenizers[model]
        if tok is None:
            raise RequestError(f"model {model!r} has no tokenizer: send the prompt as token ids")
        return tok

    def max_model_len(self, model: str) -> int:
        self._check_model(model)
        return self.control.max_model_len(model)

    def tool_parser(self, model: str) -> str | None:
        """The model's tool-call format when its config names one (None: told by its template)."""
        self._check_model(model)
        parser = self.specs[model].tool_parser
        return None if parser == "auto" else parser

    def healthy(self) -> bool:
        """Every model has a device up to serve it (a device down is fine if others serve its models)."""
        return not self._closed and all(self.control.hosting_up(m) for m in self.specs)

    def health_details(self) -> dict:
        workers = self.supervisor.worker_states()
        degraded = not self._closed and any(state != "up" for state in workers.values())
        return {"status": "degraded", "workers": workers} if degraded and self.healthy() else {"workers": workers}

    def metrics_text(self) -> tuple[bytes, str]:
        return self.metrics.exposition()

    async def generate(self, request: GenerationRequest):
        # Every request has a deadline (server.request_timeout_s), the wait for a restarting
        # device included: past it, the worker aborts it and the client gets a 504.
        deadline = time.monotonic() + self.config.request_timeout_s
        if request.model in self.specs:  # a model hosted only by restarting devices waits for one
            await self.supervisor.wait_for_device(request.model, deadline)
        stream = self._submit(request)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(stream.queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise RequestTimedOut(f"the request did not finish within the server's limit of "
                                          f"{self.config.request_timeout_s:g} s (server.request_timeout_s)") from None
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not stream.done:  # the client went away: stop spending the device on it
                stream.done = True
                self.links[stream.device].send(msg.Abort(request.req_id))
            self._streams.pop(request.req_id, None)

    # ---- submitting ------------------------------------------------------------------------
    def _submit(self, request: GenerationRequest) -> _Stream:
        if self._closed:
            raise ServerBusy("the server is shutting down")
        self._check_model(request.model)
        limit = self.max_model_len(request.model)
        if len(request.prompt_token_ids) >= limit:
            raise RequestError(f"the prompt has {len(request.prompt_token_ids)} tokens but "
                               f"{request.model}'s context limit is {limit}")
        if request.req_id in self._streams:
            raise RequestError(f"request id {request.req_id!r} is already in use")
        now = time.monotonic()
        try:
            device = self.control.route(request.model, now)
        except DeviceDown as e:
            raise self.supervisor.unavailable(request.model, e.devices) from None
        tok = self.tokenizers[request.model]
        p = request.params
        received = now if request.received_s is None else min(request.received_s, now)
        stream = _Stream(
            request, device,
            IncrementalDetokenizer(tok, p.skip_special_tokens) if tok is not None else None,
            StopStringMatcher(p.stop) if p.stop and tok is not None else None, received,
        )
        link = self.links[device]
        if not link.alive:  # send() would drop the message: the request would wait forever
            raise WorkerFailed(f"the worker for {device} is not running")
        # Stop strings stay here: the frontend detokenizes and applies them (the worker sees ids).
        # The stream is registered only once its message is on its way: a message that cannot be
        # encoded or sent leaves nothing in flight. Its age lets the device date it from when
        # it came in here (tokenizing, a wait for a restarting device and routing included).
        link.send(msg.AddRequest(
            request.req_id, request.model, list(request.prompt_token_ids), msgspec.structs.replace(p, stop=()),
            ttft_slo_s=request.ttft_slo_s, tpot_slo_s=request.tpot_slo_s, priority=request.priority,
            age_s=time.monotonic() - received,
        ))
        self._streams[request.req_id] = stream
        self.control.record_arrival(request.model, now, len(request.prompt_token_ids), p.max_tokens)
        return stream

    def _check_model(self, model: str) -> None:
        if model not in self.specs:
            raise UnknownModel(f"the model {model!r} does not exist; this server serves: "
                               + ", ".join(self.specs))

    # ---- what workers say ------------------------------------------------------------------
    def _on_message(self, device: str, m) -> None:
        if isinstance(m, msg.Tokens):
            for t in m.tokens:
                stream = self._streams.get(t.req_id)
                if stream is not None and not stream.done:
                    self._on_token(stream, t.token_id, t.logprobs)
        elif isinstance(m, msg.Finished):
            stream = self._streams.get(m.req_id)
            if stream is not None and not stream.done:
                self._finish(stream, m.finish_reason)
        elif isinstance(m, msg.Rejected):
            stream = self._streams.get(m.req_id)
            if stream is not None:
                self._fail(stream, RequestError(m.message))
        elif isinstance(m, (msg.Activated, msg.Evicted)):
            self.control.on_residency(device, m)
        elif isinstance(m, msg.MemoryReport):
            self.links[device].report = m.report
        elif isinstance(m, msg.Failed):  # the supervisor restarts it; its requests fail here
            self.supervisor.worker_failed(device, m.message)
            for stream in [s for s in self._streams.values() if s.device == device]:
                self._fail(stream, WorkerFailed(f"the worker for {device} stopped: {m.message}"))

    def _on_token(self, stream: _Stream, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        now = time.monotonic()
        stream.first_token_time = stream.first_token_time or now
        stream.last_token_time = now
        stream.num_output += 1
        text, hit = "", False
        if stream.detok is not None:
            text = stream.detok.step(token_id)
            if stream.stops is not None:
                text, hit = stream.stops.feed(text)
        stream.queue.put_nowait(self._chunk(stream, text, [token_id], logprobs=[logprobs] if logprobs else []))
        if hit:  # a stop string: the worker does not know about it, so stop it there
            self.links[stream.device].send(msg.Abort(stream.request.req_id))
            self._finish(stream, "stop", flush=False)

    def _finish(self, stream: _Stream, reason: str, flush: bool = True) -> None:
        tail = ""
        if flush and stream.detok is not None:
            tail = stream.detok.flush()
            if stream.stops is not None:
                tail, _ = stream.stops.feed(tail)
                tail += stream.stops.flush()
        stream.done = True
        stream.queue.put_nowait(self._chunk(stream, tail, [], reason))
        self._observe(stream, reason)

    def _fail(self, stream: _Stream, error: Exception) -> None:
        stream.done = True
        stream.queue.put_nowait(error)

    def _chunk(self, stream: _Stream, text: str, ids: list[int], reason: str | None = None,
               logprobs: list[TokenLogprobs] | None = None) -> GenerationChunk:
        return GenerationChunk(text, ids, reason, len(stream.request.prompt_token_ids), stream.num_output,
                               logprobs or [])

    def _observe(self, stream: _Stream, reason: str) -> None:
        spec: ModelSpec = self.specs[stream.request.model]
        ttft = stream.first_token_time - stream.arrival if stream.first_token_time else None
        tpot = None
        if stream.num_output > 1:
            tpot = (stream.last_token_time - stream.first_token_time) / (stream.num_output - 1)
        self.metrics.observe(stream.request.model, reason, ttft, tpot,
                             stream.request.ttft_slo_s or spec.ttft_slo_s,
                             stream.request.tpot_slo_s or spec.tpot_slo_s)

    # ---- the tick: reports in, global decisions out ----------------------------------------
    async def _ticker(self) -> None:
        while not self._closed:
            await asyncio.sleep(TICK_S)
            try:
                self._tick()
            except Exception:  # a policy bug must not take the server down
                log.exception("global scheduling tick failed")

    def _tick(self) -> None:
        self.control.tick(time.monotonic())

    def _residency(self) -> dict[str, list[str]]:
        return self.control.residency()

    def _reports(self) -> dict[str, msg.DeviceMemory]:
        return {d: link.report for d, link in self.links.items() if link.report is not None}

    def _queue_depth(self) -> dict[str, int]:
        depth = {m: 0 for m in self.specs}
        for s in self._streams.values():
            depth[s.request.model] += 1
        return depth

    def admin_view(self) -> dict:
        now = time.monotonic()
        return {
            "devices": {d: msgspec.to_builtins(r) for d, r in self._reports().items() if d not in self.control.down},
            "workers": self.supervisor.workers_view(),
            "placement": self._residency(),
            "nodes": self.supervisor.nodes_view(self._residency()),
            "token_rates": {m: self.control.rates.rate(m, now) for m in self.specs},
            "in_flight": self._queue_depth(),
        }

