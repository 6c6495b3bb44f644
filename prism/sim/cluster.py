"""The discrete-event cluster: the server's frontend control over simulated devices.

Events, in time order (ties in the order they were scheduled):
- arrival: a trace request reaches the frontend; `ClusterControl.route` (the server's own
  routing and on-demand activation) picks its device, and an AddRequest message goes there;
- device: a device wakes (its step ended, a message came, or an idle timer fell due): it
  hands the frontend what its last step finished, handles its inbox, and steps once;
- tick: every 0.5 s, as the server does, memory reports are asked for and the global
  scheduler's periodic work runs (`ClusterControl.tick`);
- deliver: a request reaches its device `request_latency_s` after its arrival (the host's
  HTTP, routing and IPC time, measured with the profiles; 0 by default); its AddRequest
  carries that hop as its age, so the device dates it from its arrival, as a real worker
  dates a request from when the server received it;
- timeout: a request still unfinished `request_timeout_s` after it was sent is given up, as
  the replay client does (an error, and an Abort to its device);
- TTFT due (only with `EarlyStop`): a request's TTFT SLO has passed; if it had no first token
  by then it is a miss, and once more requests missed than the target allows, the run stops
  (the planner only needs to know the target is out of reach; what was not simulated counts
  as missed, so the attainment reported is a lower bound).

Messages are the server's own (prism.worker.messages) and take no time; a device handles the
ones that came while it was busy before its next step, as a worker process does. What comes
out is one `RequestRecord` per trace request, the format `prism bench replay` writes, so the
same reports apply.
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from dataclasses import dataclass

import msgspec

from prism.bench.records import DEFAULT_REQUEST_TIMEOUT_S, RequestRecord
from prism.bench.trace import TraceRequest
from prism.cluster.config import ClusterConfig
from prism.cluster.control import TICK_S, ClusterControl, device_models
from prism.sched.global_view import TransferRates
from prism.sched.rates import window_request_rates
from prism.sim.costs import ProfileSet, card_defaults
from prism.sim.device import SimDevice
from prism.sim.executor import SAMPLED_TOKEN
from prism.sim.shapes import model_shape
from prism.types import SamplingParams
from prism.worker import messages as msg
from prism.worker.device_core import WorkerConfig

_ARRIVAL, _DEVICE, _TICK, _TIMEOUT, _TTFT_DUE, _DELIVER = range(6)
MAX_ZERO_TIME_STEPS = 64  # a device that keeps "making progress" without time passing sleeps


@dataclass
class SimLink:
    """One simulated device as ClusterControl sees it (prism.cluster.control.DeviceLink)."""

    device_id: str
    ready: msg.Ready
    report: msg.DeviceMemory | None
    cluster: "SimCluster"

    def send(self, message) -> None:
        self.cluster.deliver(self.device_id, message)


@dataclass
class _DeviceState:
    device: SimDevice
    inbox: list  # (message, when it reached the device), as a worker's inbox dates them
    wake_at: float | None = None  # the pending wake-up (None: asleep until a message)
    busy: bool = False  # the pending wake-up is the end of a step (cannot come earlier)
    token: int = 0  # which pending wake-up is current (older heap entries are stale)
    zero_time_steps: int = 0
    finished: list | None = None  # what the running step finishes, handed over at its end


@dataclass(frozen=True)
class EarlyStop:
    ttft_slo_s: dict[str, float]  # per model, as the report judges it
    max_misses: int  # stop once more requests than this missed their TTFT


class SimCluster:
    def __init__(self, config: ClusterConfig, profiles: ProfileSet,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, tick_s: float = TICK_S,
                 early_stop: EarlyStop | None = None):
        self.config = config
        self.request_latency_s = profiles.host.request_s  # frontend to worker, and back
        self.early_stop = early_stop
        self.stopped_at: float | None = None  # when an early stop ended the run
        self._ttft_misses = 0
        self.request_timeout_s = request_timeout_s
        self.tick_s = tick_s
        self.now = 0.0
        self.t0 = 0.0  # when the trace starts (after the initial placement settled)
        self.cost_sources: dict[tuple[str, str], str] = {}  # (device, model) -> measured/scaled/roofline
        # Per node, the models whose weights it holds in host memory (its devices share them)
        self.host_copies: dict[str, set[str]] = {n.name: set() for n in config.nodes}
        self.devices = {d.device_id: _DeviceState(self._make_device(d, profiles), []) for d in config.devices}
        self.links = {
            d: SimLink(d, msg.Ready(d, [s.device.model_info(m) for m in s.device.engines]), None, self)
            for d, s in self.devices.items()
        }
        self.in_flight: Counter = Counter()  # model -> requests in flight
        self.control = ClusterControl(config, self.links, lambda: dict(self.in_flight))
        self.control.transfer = TransferRates(card_defaults(config.devices[0].device).h2d_bytes_per_s,
                                              profiles.host.storage_bytes_per_s)
        self.memory_samples: list[dict] = []  # every memory report, as the frontend got them
        self._heap: list = []
        self._seq = itertools.count()
        self._records: dict[str, RequestRecord] = {}
        self._where: dict[str, str] = {}  # req_id -> device
        self.num_events = 0

    def activation_counts(self) -> tuple[int, int]:
        """(activations, those that read storage first) over every device, the start included."""
        activations = sum(sum(st.device.counters.activations.values()) for st in self.devices.values())
        reads = sum(e.executor.num_storage_reads for st in self.devices.values() for e in st.device.engines.values())
        return activations, reads

    # ---- building ------------------------------------------------------------------------------
    def _make_device(self, dev, profiles: ProfileSet) -> SimDevice:
        specs = device_models(self.config, dev.device_id)
        gpus = self.config.gpus.get(dev.device_id, 1)
        shapes = {s.name: model_shape(s, dev.device) for s in specs}
        truth, how = profiles.cost_model(shapes, dev.device, gpus)
        self.cost_sources.update({(dev.device_id, m): h for m, h in how.items()})
        # A real worker plans with the profiles measured for its models; a TP group has no
        # real worker, so it plans with the group's own profiles.
        if gpus == 1:
            installed = profiles.measured if profiles.host.server_has_profiles else {}
            policy = {s.source: installed[s.source] for s in specs if s.source in installed}
        else:
            policy = {s.source: truth.profile(s.name) for s in specs}
        wc = WorkerConfig(dev, specs, self.config.local, sample_interval_s=math.inf,
                          detokenize=False, metrics_keep_last=0)
        return SimDevice(wc, shapes, truth, policy, host=profiles.host,
                         host_copies=self.host_copies.setdefault(dev.node, set()), gpus=gpus,
                         concurrent_rates=profiles.concurrent_rates(dev.device),
                         contention_rule=profiles.contention_rule(dev.device),
                         interleave=profiles.interleave(dev.device))

    # ---- messages ------------------------------------------------------------------------------
    def deliver(self, device_id: str, message) -> None:
        """A message for a device: it handles it before its next step (now, if idle)."""
        st = self.devices[device_id]
        st.inbox.append((message, self.now))
        if not st.busy and (st.wake_at is None or st.wake_at > self.now):
            self._wake(device_id, self.now, busy=False)

    def _reply(self, device_id: str, m) -> None:
        if isinstance(m, msg.MemoryReport):
            self.links[device_id].report = m.report
            self.memory_samples.append({"kind": "device", **msgspec.to_builtins(m.report)})
        elif isinstance(m, (msg.Activated, msg.Evicted)):
            self.control.on_residency(device_id, m)
        elif isinstance(m, msg.Rejected):
            self._fail(m.req_id, f"BadRequestError: {m.message}")

    def _wake(self, device_id: str, t: float, busy: bool) -> None:
        st = self.devices[device_id]
        st.token += 1
        st.wake_at, st.busy = t, busy
        self._push(t, _DEVICE, (device_id, st.token))

    def _push(self, t: float, kind: int, payload) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, payload))

    # ---- running -------------------------------------------------------------------------------
    def run(self, trace: list[TraceRequest]) -> list[RequestRecord]:
        """Simulate `trace` (arrival times from 0) to the end; one record per request."""
        trace = sorted(trace, key=lambda r: r.arrival_s)
        # As a deployment that watched its traffic for a while before placing its models: the
        # frontend's own tracker over the first placement_window_s of arrivals.
        window = self.config.global_.placement_window_s
        measured = window_request_rates(((r.model, r.arrival_s) for r in trace), window)
        longest = max((r.input_len + r.output_len for r in trace), default=None)
        self.control.start(self.now, measured, window, longest)
        self.t0 = self._settle()
        for i, r in enumerate(trace):
            self._push(self.t0 + r.arrival_s, _ARRIVAL, (i, r))
        self._push(self.t0 + self.tick_s, _TICK, None)
        pending_arrivals = len(trace)
        records: list[RequestRecord] = []
        while self._heap:
            t, _, kind, payload = heapq.heappop(self._heap)
            self.now = t
            self.num_events += 1
            if kind == _ARRIVAL:
                records.append(self._arrive(*payload))
                pending_arrivals -= 1
            elif kind == _DEVICE:
                self._run_device(*payload)
            elif kind == _TICK:
                self.control.tick(t)
                if pending_arrivals or self._records:
                    self._push(t + self.tick_s, _TICK, None)
            elif kind == _DELIVER:
                self.deliver(*payload)
            elif kind == _TIMEOUT:
                self._timeout(payload)
            elif self._ttft_due(payload):
                self.stopped_at = t
                return self._stop(records, trace)
            if not pending_arrivals and not self._records:
                break  # every request is answered; what devices do next no one would see
        return records

    def _settle(self) -> float:
        """Run the start (the initial placement's evictions, activations and KV caps) until
        every device is idle, and return when that was: the trace starts then, as a replay
        starts once the server is up. Records count time from there."""
        while self._heap and any(st.busy or st.inbox for st in self.devices.values()):
            t, _, kind, payload = heapq.heappop(self._heap)
            self.now = t
            if kind == _DEVICE:
                self._run_device(*payload)
        return self.now

    def _ttft_due(self, req_id: str) -> bool:
        """Whether this request's TTFT miss puts the target out of reach."""
        rec = self._records.get(req_id)
        if rec is not None:
            st = self.devices[self._where[req_id]].device
            first = st.engines[rec.model].first_token_time(req_id)
            missed = first is None or first - self.t0 - rec.send_s > self.early_stop.ttft_slo_s[rec.model]
        else:
            return False  # finished: the report judges it
        self._ttft_misses += missed
        return self._ttft_misses > self.early_stop.max_misses

    def _stop(self, records: list[RequestRecord], trace: list[TraceRequest]) -> list[RequestRecord]:
        for rec in self._records.values():
            rec.error, rec.finish_s = "not simulated: the run stopped early", self.now - self.t0
        for i, r in enumerate(trace[len(records):], start=len(records)):
            records.append(RequestRecord(i, r.model, r.input_len, r.output_len, r.arrival_s,
                                         error="not simulated: the run stopped early"))
        self._records.clear()
        return records

    def _arrive(self, index: int, r: TraceRequest) -> RequestRecord:
        req_id = str(index)
        rec = RequestRecord(index, r.model, r.input_len, r.output_len, r.arrival_s, send_s=self.now - self.t0,
                            prompt_kind="ids")
        if r.model not in self.control.specs:
            rec.error, rec.finish_s = f"NotFoundError: the model {r.model!r} does not exist", rec.send_s
            return rec
        limit = self.control.max_model_len(r.model)
        if r.input_len >= limit:
            rec.error = (f"BadRequestError: the prompt has {r.input_len} tokens but {r.model}'s "
                         f"context limit is {limit}")
            rec.finish_s = rec.send_s
            return rec
        device = self.control.route(r.model, self.now)
        self.control.record_arrival(r.model, self.now, r.input_len, r.output_len)
        self._records[req_id] = rec
        self._where[req_id] = device
        self.in_flight[r.model] += 1
        self._push(self.now + self.request_timeout_s, _TIMEOUT, req_id)
        if self.early_stop is not None and r.model in self.early_stop.ttft_slo_s:
            self._push(self.now + self.early_stop.ttft_slo_s[r.model], _TTFT_DUE, req_id)
        params = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
        # The whole hop counts as the frontend's time, so the request goes out as old as the
        # hop and the device dates it from its arrival here, as the server's frontend does.
        add = msg.AddRequest(req_id, r.model, [SAMPLED_TOKEN] * r.input_len, params,
                             age_s=self.request_latency_s)
        if self.request_latency_s > 0:  # the HTTP and IPC hops, taken as one delay on the way in
            self._push(self.now + self.request_latency_s, _DELIVER, (device, add))
        else:
            self.deliver(device, add)
        return rec

    def _run_device(self, device_id: str, token: int) -> None:
        st = self.devices[device_id]
        if token != st.token:
            return  # superseded by an earlier wake-up
        st.wake_at, st.busy = None, False
        if st.finished:
            for _, out in st.finished:
                self._finish(out)
            st.finished = None
        inbox, st.inbox = st.inbox, []
        out, next_t = st.device.run(self.now, inbox, lambda m: self._reply(device_id, m))
        st.finished = out.finished or None
        if st.finished and st.device.clock.now() <= self.now:  # read now (models at their own pace)
            for _, done in st.finished:
                self._finish(done)
            st.finished = None
        if next_t is None:
            st.zero_time_steps = 0
            return  # asleep until a message comes
        st.zero_time_steps = st.zero_time_steps + 1 if next_t <= self.now else 0
        if st.zero_time_steps > MAX_ZERO_TIME_STEPS:
            st.zero_time_steps = 0
            next_t = st.device.quiet_wake()  # decisions churn without time passing: wait
            if next_t is None:
                return
        # Busy until the step's end (messages wait for it); a timer is no step: a message wakes
        # the device sooner. A device whose clock moved (an activation's copy, a step waited
        # for) and that then waits for later (a timer, at their own pace a step in flight) is
        # busy only until its clock: it wakes then, and messages that came meanwhile are read.
        end = st.device.clock.now()
        self._wake(device_id, min(next_t, end) if end > self.now else next_t, busy=end > self.now)

    def _finish(self, out) -> None:
        rec = self._records.pop(out.req_id, None)
        if rec is None:
            return  # given up (timeout) already
        m = out.metrics
        rec.token_s = [t - self.t0 for t in m["token_times"]]
        rec.num_output_tokens = m["num_output_tokens"]
        rec.finish_s = self.now - self.t0
        rec.finish_reason = out.finish_reason.value
        self._done(out.req_id, rec)

    def _fail(self, req_id: str, error: str) -> None:
        rec = self._records.pop(req_id, None)
        if rec is not None:
            rec.error, rec.finish_s = error, self.now - self.t0
            self._done(req_id, rec)

    def _timeout(self, req_id: str) -> None:
        if req_id in self._records:
            device = self._where[req_id]
            self._fail(req_id, f"Timeout: not finished within {self.request_timeout_s:g} s")
            self.deliver(device, msg.Abort(req_id))  # the client went away

    def _done(self, req_id: str, rec: RequestRecord) -> None:
        self.in_flight[rec.model] -= 1
        self._where.pop(req_id, None)
