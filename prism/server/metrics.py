"""Prometheus metrics of the server: request latencies and SLO attainment per model (kept
here), and device memory, activations, evictions and preemptions (read from the workers'
latest memory reports when scraped), per device and node: every per-device family has a `node`
label ("" on a single host), and prism_nodes / prism_node_up / prism_device_up say what is up."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from prism.worker.messages import DeviceMemory

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class Topology:
    """Nodes and devices as the router knows them when scraped."""

    nodes: dict[str, bool]  # node -> in the cluster
    device_nodes: dict[str, str]  # device -> its node
    devices_up: dict[str, bool]  # device -> its worker serving


def single_host(reports: dict[str, DeviceMemory]) -> Topology:
    return Topology({"": True}, {d: "" for d in reports}, {d: True for d in reports})


class ServerMetrics:
    def __init__(self, reports: Callable[[], dict[str, DeviceMemory]], queue_depth: Callable[[], dict[str, int]],
                 topology: Callable[[], Topology] | None = None):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("prism_ttft_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("prism_tpot_seconds", "Mean time per output token of a request",
                              ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.finished: Counter = Counter()  # (model, finish_reason)
        self.slo_met: Counter = Counter()  # (model, "ttft"|"tpot")
        self.slo_total: Counter = Counter()
        self.migrations: Counter = Counter()  # model
        self.worker_deaths: Counter = Counter()  # device
        self.worker_restarts: Counter = Counter()  # (device, "ok" | "failed"): attempts that ended so
        self._reports = reports
        self._queue_depth = queue_depth
        self._topology = topology or (lambda: single_host(reports()))
        self.registry.register(_Collector(self))

    def observe(self, model: str, finish_reason: str, ttft: float | None, tpot: float | None,
                ttft_slo: float, tpot_slo: float) -> None:
        self.finished[(model, finish_reason)] += 1
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        if tpot is not None:
            self.tpot.labels(model).observe(tpot)
        # A request that never produced a token missed its TTFT; one with a single token
        # has no TPOT to miss.
        self.slo_total[(model, "ttft")] += 1
        self.slo_met[(model, "ttft")] += ttft is not None and ttft <= ttft_slo
        self.slo_total[(model, "tpot")] += 1
        self.slo_met[(model, "tpot")] += tpot is None or tpot <= tpot_slo

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Collector:
    def __init__(self, m: ServerMetrics):
        self.m = m

    def collect(self):
        m = self.m
        done = CounterMetricFamily("prism_requests", "Finished requests", labels=["model", "finish_reason"])
        for (model, reason), n in m.finished.items():
            done.add_metric([model, reason], n)
        attain = GaugeMetricFamily("prism_slo_attainment", "Fraction of finished requests within their SLO",
                                   labels=["model", "slo"])
        for key, total in m.slo_total.items():
            attain.add_metric(list(key), m.slo_met[key] / total)
        depth = GaugeMetricFamily("prism_queue_depth", "Requests in flight", labels=["model"])
        for model, n in m._queue_depth().items():
            depth.add_metric([model], n)
        migr = CounterMetricFamily("prism_migrations", "Model migrations", labels=["model"])
        for model, n in m.migrations.items():
            migr.add_metric([model], n)
        deaths = CounterMetricFamily("prism_worker_deaths", "Device workers that died", labels=["device"])
        for device, n in m.worker_deaths.items():
            deaths.add_metric([device], n)
        restarts = CounterMetricFamily("prism_worker_restarts", "Attempts to start a dead device worker again",
                                       labels=["device", "result"])
        for (device, result), n in m.worker_restarts.items():
            restarts.add_metric([device, result], n)
        yield from (done, attain, depth, migr, deaths, restarts)
        topology = m._topology()
        yield from _node_families(topology)
        yield from _device_families(m._reports(), topology.device_nodes)


def _node_families(t: Topology):
    nodes = GaugeMetricFamily("prism_nodes", "Nodes up (single host: 1; on Ray: the cluster's alive nodes)")
    nodes.add_metric([], sum(t.nodes.values()))
    node_up = GaugeMetricFamily("prism_node_up", "1 while the node is in the cluster", labels=["node"])
    for node, up in t.nodes.items():
        node_up.add_metric([node], 1 if up else 0)
    device_up = GaugeMetricFamily("prism_device_up", "1 while the device's worker serves", labels=["device", "node"])
    for device, up in t.devices_up.items():
        device_up.add_metric([device, t.device_nodes.get(device, "")], 1 if up else 0)
    yield from (nodes, node_up, device_up)


def _device_families(reports: dict[str, DeviceMemory], device_nodes: dict[str, str]):
    pages = GaugeMetricFamily("prism_pages", "Pages held per model", labels=["device", "node", "model", "kind"])
    free = GaugeMetricFamily("prism_free_pages", "Free pages per device", labels=["device", "node"])
    page_bytes = GaugeMetricFamily("prism_page_bytes", "Page size per device", labels=["device", "node"])
    resident = GaugeMetricFamily("prism_model_resident", "1 if the model's weights are on the device",
                                 labels=["device", "node", "model"])
    counters = {name: CounterMetricFamily(f"prism_{name}", f"Model {name} per device", labels=["device", "node", "model"])
                for name in ("activations", "evictions", "preemptions")}
    for device, rep in reports.items():
        node = device_nodes.get(device, "")
        free.add_metric([device, node], rep.free_pages)
        page_bytes.add_metric([device, node], rep.page_size)
        for model, st in rep.models.items():
            pages.add_metric([device, node, model, "weights"], st.weight_pages)
            pages.add_metric([device, node, model, "kv"], st.kv_pages)
            resident.add_metric([device, node, model], 1 if st.resident else 0)
            for name, fam in counters.items():
                fam.add_metric([device, node, model], getattr(st, name))
    yield from (pages, free, page_bytes, resident, *counters.values())


class RequestOutcomes:
    """How HTTP requests for completions ended, counted by the frontend (any backend):
    finished (reason: the finish reason), aborted (the client went away), failed (the server's
    fault) and rejected (reason: bad_request, unknown_model, too_long, too_large, busy, ...)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.counter = PromCounter("prism_requests_outcome", "Completion requests by how they ended",
                                   ["model", "outcome", "reason"], registry=self.registry)

    def record(self, model: str, outcome: str, reason: str) -> None:
        self.counter.labels(model, outcome, reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
