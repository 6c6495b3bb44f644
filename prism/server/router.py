"""The router: the frontend's half of serving (implements ServingBackend).

It starts one device worker per device (through a Launcher: a local process, or a Ray actor
on a cluster's node), tokenizes and detokenizes (stop strings included),
routes each request to a device through the global scheduler, streams results back, and
every tick refreshes the workers' memory reports and runs the global scheduler's periodic
work (idle eviction, migration). Mechanism only: the decisions come from prism.sched.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec

from prism.cluster.config import ClusterConfig
from prism.cluster.control import TICK_S, ClusterControl, DeviceDown, device_models
from prism.cluster.supervision import MAX_RESTART_WAIT_S, RestartBudget
from prism.cluster.worker_link import Launcher, LocalLauncher, NodeGone, WorkerLink
from prism.config import ConfigError, DeviceConfig, ModelSpec
from prism.engine.catalog import resolve_model
from prism.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from prism.engine.tokenizer import Tokenizer, load_tokenizer
from prism.server.backend import (GenerationChunk, GenerationRequest, ModelCard, RequestTimedOut, ServerBusy,
                                  UnknownModel, WorkerFailed)
from prism.server.metrics import ServerMetrics, Topology
from prism.types import RequestError, TokenLogprobs
from prism.worker import messages as msg
from prism.worker.device_core import WorkerConfig

log = logging.getLogger("prism.router")
NODE_POLL_S = 1.0  # how often the launcher looks at the cluster's nodes (joined, left)


@dataclass
class _Stream:
    """One request in flight, as the frontend tracks it."""

    request: GenerationRequest
    device: str
    detok: IncrementalDetokenizer | None
    stops: StopStringMatcher | None
    arrival: float
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
        self.metrics = ServerMetrics(self._reports, self._queue_depth, self._topology)
        # Routing, placement and global ticks: shared with the simulator (prism.sim).
        self._initial_devices = self.launcher.devices()
        self.control = ClusterControl(config, self.links, self._queue_depth, self.metrics.migrations,
                                      self._initial_devices)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_task: asyncio.Task | None = None
        self._nodes_task: asyncio.Task | None = None
        self._closed = False
        # Supervision: each device's WorkerConfig (to start it again), how long it took to
        # start (what a request waiting for a restart expects), restarts in progress (an
        # event set once the device is back or given up) and devices failed for good.
        self._worker_configs: dict[str, WorkerConfig] = {}
        self._start_s: dict[str, float] = {}
        self._restarting: dict[str, asyncio.Event] = {}
        self._restart_tasks: set[asyncio.Task] = set()
        self.failed: set[str] = set()
        self.node_left: set[str] = set()  # devices down with their node: started again when it is back
        self._joining: set[str] = set()  # devices of a joined node whose worker is starting
        self.restarts = RestartBudget()
        self.tokenizers = self._load_tokenizers()  # first: a bad model name fails fast
        self._start_workers()

    # ---- start and stop --------------------------------------------------------------------
    def _start_workers(self) -> None:
        devices = self._initial_devices
        if not devices:
            self.launcher.close()
            raise ConfigError("no device to start: the config lists none (ray.auto_devices is read with --ray only), "
                              "or no listed device's node is in the Ray cluster")

        def start(device):
            self._configure(device)
            return self._new_link(device.device_id)

        with ThreadPoolExecutor(len(devices)) as pool:
            futures = [pool.submit(start, d) for d in devices]
            errors = []
            for f in futures:
                try:
                    link = f.result()
                    self.links[link.device_id] = link
                except Exception as e:  # close what did start, then report the first failure
                    errors.append(e)
        if errors:
            self.close()
            raise errors[0]

    def _configure(self, device: DeviceConfig) -> None:
        self._worker_configs[device.device_id] = WorkerConfig(
            device, device_models(self.config, device.device_id), self.config.local, detokenize=False,
            metrics_path=_device_log(self.config.metrics_log, device.device_id),
            host_copy_dir=self.launcher.host_copy_dir(device.node))

    def _new_link(self, device: str) -> WorkerLink:
        """Start `device`'s worker; blocks until it is ready (run it off the event loop)."""
        began = time.monotonic()
        link = WorkerLink(device, self.launcher.start(self._worker_configs[device]), self.launcher.silence_timeout_s)
        self._start_s[device] = time.monotonic() - began
        return link

    def _load_tokenizers(self) -> dict[str, Tokenizer | None]:
        out = {}
        for spec in self.config.models:
            source = resolve_model(spec.source)
            out[spec.name] = load_tokenizer(source.tokenizer_path) if source.tokenizer_path else None
        return out

    async def start(self) -> None:
        """Attach to the running event loop (the HTTP server's), lay the models out over the
        devices, and start ticking."""
        self._loop = asyncio.get_running_loop()
        for link in self.links.values():
            link.attach(self._loop, self._on_message)
        self.control.start(time.monotonic())
        self._tick_task = asyncio.create_task(self._ticker())
        self._nodes_task = asyncio.create_task(self._watch_nodes())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._tick_task, self._nodes_task):
            if task is not None:
                task.cancel()
        for task in list(self._restart_tasks):  # a worker started meanwhile is closed by its task
            task.cancel()
        for stream in self._streams.values():
            self._fail(stream, ServerBusy("the server is shutting down"))
        for link in self.links.values():
            link.close()
        self.launcher.close()

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
        workers = self._worker_states()
        degraded = not self._closed and any(state != "up" for state in workers.values())
        return {"status": "degraded", "workers": workers} if degraded and self.healthy() else {"workers": workers}

    def _worker_states(self) -> dict[str, str]:
        def state(device):
            if device in self.failed:
                return "failed"
            if device in self.node_left:
                return "node_left"
            if device in self._restarting or not self.links[device].alive:
                return "restarting"
            return "up"
        return {d: state(d) for d in self.links}

    def metrics_text(self) -> tuple[bytes, str]:
        return self.metrics.exposition()

    async def generate(self, request: GenerationRequest):
        # Every request has a deadline (server.request_timeout_s), the wait for a restarting
        # device included: past it, the worker aborts it and the client gets a 504.
        deadline = time.monotonic() + self.config.request_timeout_s
        await self._wait_for_device(request.model, deadline)
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
            restarting = [d for d in e.devices if d in self._restarting]
            if not restarting:
                left = [d for d in e.devices if d in self.node_left]
                if left:
                    raise WorkerFailed(f"the node of every worker serving {request.model!r} left the cluster: "
                                       f"{', '.join(left)}", retry_after_s=NODE_POLL_S * 5) from None
                raise WorkerFailed(f"every worker serving {request.model!r} failed for good: {', '.join(e.devices)}") from None
            raise WorkerFailed(f"the worker serving {request.model!r} is restarting; retry later",
                               retry_after_s=self._expected_restart_s(restarting)) from None
        tok = self.tokenizers[request.model]
        p = request.params
        stream = _Stream(
            request, device,
            IncrementalDetokenizer(tok, p.skip_special_tokens) if tok is not None else None,
            StopStringMatcher(p.stop) if p.stop and tok is not None else None, now,
        )
        link = self.links[device]
        if not link.alive:  # send() would drop the message: the request would wait forever
            raise WorkerFailed(f"the worker for {device} is not running")
        # Stop strings stay here: the frontend detokenizes and applies them (the worker sees ids).
        # The stream is registered only once its message is on its way: a message that cannot be
        # encoded or sent leaves nothing in flight.
        link.send(msg.AddRequest(
            request.req_id, request.model, list(request.prompt_token_ids), msgspec.structs.replace(p, stop=()),
            ttft_slo_s=request.ttft_slo_s, tpot_slo_s=request.tpot_slo_s, priority=request.priority,
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
        elif isinstance(m, msg.Failed):
            log.error("worker %s failed: %s", device, m.message)
            self.links[device].alive = False
            self.control.mark_down(device)
            for stream in [s for s in self._streams.values() if s.device == device]:
                self._fail(stream, WorkerFailed(f"the worker for {device} stopped: {m.message}"))
            self._supervise(device)

    # ---- supervision: a dead worker is started again ---------------------------------------
    def _supervise(self, device: str) -> None:
        if self._closed or device in self._restarting or self._loop is None:
            return
        self._restarting[device] = asyncio.Event()
        self.metrics.worker_deaths[device] += 1
        task = self._loop.create_task(self._restart(device), name=f"restart-{device}")
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)

    async def _restart(self, device: str) -> None:
        """Start `device`'s worker again, with backoff, until it is up or the budget is spent
        (then it is failed for good; other devices keep serving the models they host)."""
        loop = asyncio.get_running_loop()
        try:
            old = self.links[device]
            await loop.run_in_executor(None, old.close)  # reap the dead process (joins it)
            await loop.run_in_executor(None, self.launcher.refresh)
            if not self._node_alive(device):
                self._wait_for_node(device)
                return
            while not self._closed:
                delay = self.restarts.next_delay(device, time.monotonic())
                if delay is None:
                    log.error("worker %s failed %d times within %.0f s: given up", device,
                              self.restarts.max_restarts, self.restarts.window_s)
                    self.failed.add(device)
                    return
                await asyncio.sleep(delay)
                try:  # WorkerProcess blocks until Ready: not on the event loop
                    link = await loop.run_in_executor(None, self._new_link, device)
                except NodeGone:
                    self._wait_for_node(device)
                    return
                except Exception as e:
                    log.error("restarting worker %s failed: %s", device, e)
                    self.metrics.worker_restarts[(device, "failed")] += 1
                    continue
                if self._closed:
                    link.close()
                    return
                self.links[device] = link  # the dict ClusterControl shares: fresh Ready, no report yet
                link.attach(loop, self._on_message)
                self.control.mark_up(device)
                self.metrics.worker_restarts[(device, "ok")] += 1
                log.info("worker %s restarted (attempt %d)", device, self.restarts.attempts(device))
                return
        finally:
            self._restarting.pop(device).set()

    def _node_alive(self, device: str) -> bool:
        return self.launcher.nodes().get(self._worker_configs[device].device.node, False)

    def _wait_for_node(self, device: str) -> None:
        """`device`'s node left the cluster: no restart until it is back (`_watch_nodes`)."""
        log.error("worker %s: its node %r left the cluster; it starts again when the node is back",
                  device, self._worker_configs[device].device.node)
        self.node_left.add(device)

    # ---- nodes joining and leaving ----------------------------------------------------------
    async def _watch_nodes(self) -> None:
        """Every NODE_POLL_S: devices of a node that joined get workers (added to the cluster's
        control, models placed there by the global scheduler from then on); devices whose node
        came back are started again."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(NODE_POLL_S)
            try:
                await loop.run_in_executor(None, self.launcher.refresh)
                for device in self.launcher.devices():
                    self._adopt(device)
            except Exception:  # the cluster's API failing must not take the server down
                log.exception("looking at the cluster's nodes failed")

    def _adopt(self, device: DeviceConfig) -> None:
        """Start the worker of a device whose node joined, or came back (a node that returns
        is one that joins: its device starts empty, see ClusterControl.add_device)."""
        device_id = device.device_id
        returning = device_id in self.node_left
        if self._closed or device_id in self._joining | self.failed or (device_id in self.links and not returning):
            return
        self.node_left.discard(device_id)
        self._joining.add(device_id)
        self._configure(device)
        task = self._loop.create_task(self._join(device, returning), name=f"join-{device_id}")
        self._restart_tasks.add(task)
        task.add_done_callback(self._restart_tasks.discard)

    async def _join(self, device: DeviceConfig, returning: bool) -> None:
        try:
            link = await asyncio.get_running_loop().run_in_executor(None, self._new_link, device.device_id)
        except Exception as e:  # tried again at the next poll, within the restart budget
            log.error("starting worker %s on a joined node failed: %s", device.device_id, e)
            if self.restarts.next_delay(device.device_id, time.monotonic()) is None:
                self.failed.add(device.device_id)
            elif returning:
                self.node_left.add(device.device_id)
            return
        finally:
            self._joining.discard(device.device_id)
        if self._closed:
            link.close()
            return
        link.attach(self._loop, self._on_message)
        self.control.add_device(device, link)
        log.info("worker %s joined (node %r)", device.device_id, device.node)

    def _expected_restart_s(self, devices: list[str]) -> float:
        """A bounded guess of when a restarting device is back: backoff plus its start time."""
        guess = min(self.restarts.delay(d) + self._start_s.get(d, 5.0) for d in devices)
        return min(MAX_RESTART_WAIT_S, guess * 1.5 + 1.0)

    async def _wait_for_device(self, model: str, deadline: float) -> None:
        """A request whose model only restarting devices host waits for one of them (bounded:
        the restart's expected time and the request's deadline); then it is routed as usual."""
        if model not in self.specs or self.control.hosting_up(model):
            return
        restarting = [d for d in self.control.hosting(model) if d in self._restarting]
        if not restarting:
            return
        wait_s = min(self._expected_restart_s(restarting), deadline - time.monotonic())
        waiters = [asyncio.ensure_future(self._restarting[d].wait()) for d in restarting]
        try:
            await asyncio.wait(waiters, timeout=max(0.0, wait_s), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

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

    def _topology(self) -> Topology:
        states = self._worker_states()
        device_nodes = {d: wc.device.node for d, wc in self._worker_configs.items() if d in self.links}
        nodes = {n: True for n in device_nodes.values()} | self.launcher.nodes()
        return Topology(nodes, device_nodes, {d: st == "up" for d, st in states.items()})

    def _nodes_view(self) -> dict:
        """node -> whether it is in the cluster, its devices (worker state) and the models
        resident on each of them."""
        t, states, resident = self._topology(), self._worker_states(), self._residency()
        return {node: {"up": up,
                       "devices": {d: states[d] for d, n in t.device_nodes.items() if n == node},
                       "placement": {d: sorted(m for m, ds in resident.items() if d in ds)
                                     for d, n in t.device_nodes.items() if n == node}}
                for node, up in t.nodes.items()}

    def admin_view(self) -> dict:
        now = time.monotonic()
        return {
            "devices": {d: msgspec.to_builtins(r) for d, r in self._reports().items() if d not in self.control.down},
            "workers": {d: {"state": s, "restarts": self.restarts.attempts(d)} for d, s in self._worker_states().items()},
            "placement": self._residency(),
            "nodes": self._nodes_view(),
            "token_rates": {m: self.control.rates.rate(m, now) for m in self.specs},
            "in_flight": self._queue_depth(),
        }


def _device_log(path: str | None, device: str) -> str | None:
    if path is None:
        return None
    stem, dot, ext = path.rpartition(".")
    slug = device.replace(":", "").replace("/", "-")
    return f"{stem}-{slug}.{ext}" if dot else f"{path}-{slug}"

