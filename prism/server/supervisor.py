"""Supervision of the device workers, the frontend's side: their lifecycle, not their requests.

The Supervisor starts one worker per device (through a Launcher: a local process, or a Ray actor
on a cluster's node), notices one dead, takes it out of the cluster's control and starts it
again with backoff (`RestartBudget`) until it is up or given up; a device whose node left the
cluster waits for the node, and the devices of a node that joins get workers. The router asks
it what state each worker is in and what to tell a client whose model has no device up; the
requests themselves (streams, their failures) stay the router's. It shares the router's dict of
links (ClusterControl reads the same one) and replaces a link there when its worker restarts.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from prism.cluster.config import ClusterConfig
from prism.cluster.control import ClusterControl, device_models
from prism.cluster.supervision import MAX_RESTART_WAIT_S, RestartBudget
from prism.cluster.worker_link import Launcher, NodeGone, OnMessage, WorkerLink
from prism.config import ConfigError, DeviceConfig
from prism.server.backend import WorkerFailed
from prism.server.metrics import ServerMetrics, Topology
from prism.worker.device_core import WorkerConfig

log = logging.getLogger("prism.router")
NODE_POLL_S = 1.0  # how often the launcher looks at the cluster's nodes (joined, left)


class Supervisor:
    def __init__(self, config: ClusterConfig, launcher: Launcher, links: dict[str, WorkerLink],
                 control: ClusterControl, metrics: ServerMetrics):
        self.config = config
        self.launcher = launcher
        self.links = links  # the router's: ClusterControl reads the same dict
        self.control = control
        self.metrics = metrics  # worker deaths and restarts are counted here
        self.restarts = RestartBudget()
        self.failed: set[str] = set()
        self.node_left: set[str] = set()  # devices down with their node: started again when it is back
        # Each device's WorkerConfig (to start it again), how long it took to start (what a
        # request waiting for a restart expects), restarts in progress (an event set once the
        # device is back or given up) and devices of a joined node whose worker is starting.
        self._worker_configs: dict[str, WorkerConfig] = {}
        self._start_s: dict[str, float] = {}
        self._restarting: dict[str, asyncio.Event] = {}
        self._joining: set[str] = set()
        self._tasks: set[asyncio.Task] = set()  # restarts and joins in progress
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: OnMessage | None = None
        self._nodes_task: asyncio.Task | None = None
        self._closed = False

    # ---- start and stop --------------------------------------------------------------------
    def start_workers(self, devices: list[DeviceConfig]) -> None:
        """Start every device's worker at once (blocking until each is ready); the first
        failure is raised, the workers that did start are in `links` (close() stops them)."""
        if not devices:
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
                except Exception as e:
                    errors.append(e)
        if errors:
            raise errors[0]

    def start(self, on_message: OnMessage) -> None:
        """On the running event loop (the HTTP server's): deliver every worker's messages to
        `on_message` and start watching the cluster's nodes."""
        self._loop = asyncio.get_running_loop()
        self._on_message = on_message
        for link in self.links.values():
            link.attach(self._loop, on_message)
        self._nodes_task = asyncio.create_task(self._watch_nodes())

    def close(self) -> None:
        """Stop watching and restarting, then every worker and the launcher."""
        self._closed = True
        if self._nodes_task is not None:
            self._nodes_task.cancel()
        for task in list(self._tasks):  # a worker started meanwhile is closed by its task
            task.cancel()
        for link in self.links.values():
            link.close()
        self.launcher.close()

    def _configure(self, device: DeviceConfig) -> None:
        self._worker_configs[device.device_id] = WorkerConfig(
            device, device_models(self.config, device.device_id), self.config.local, detokenize=False,
            metrics_path=_device_log(self.config.metrics_log, device.device_id),
            host_copy_dir=self.launcher.host_copy_dir(device.node),
            cpu_workers_on_node=sum(1 for d in self.config.devices if not d.is_cuda and d.node == device.node))

    def _new_link(self, device: str) -> WorkerLink:
        """Start `device`'s worker; blocks until it is ready (run it off the event loop)."""
        began = time.monotonic()
        link = WorkerLink(device, self.launcher.start(self._worker_configs[device]), self.launcher.silence_timeout_s)
        self._start_s[device] = time.monotonic() - began
        return link

    def _spawn(self, coro, name: str) -> None:
        task = self._loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- what the router asks --------------------------------------------------------------
    def worker_states(self) -> dict[str, str]:
        def state(device):
            if device in self.failed:
                return "failed"
            if device in self.node_left:
                return "node_left"
            if device in self._restarting or not self.links[device].alive:
                return "restarting"
            return "up"
        return {d: state(d) for d in self.links}

    def unavailable(self, model: str, devices: list[str]) -> WorkerFailed:
        """The error for a request of `model` when every device hosting it is down: retry after
        the expected restart, after the node's return, or not at all (failed for good)."""
        restarting = [d for d in devices if d in self._restarting]
        if restarting:
            return WorkerFailed(f"the worker serving {model!r} is restarting; retry later",
                                retry_after_s=self._expected_restart_s(restarting))
        left = [d for d in devices if d in self.node_left]
        if left:
            return WorkerFailed(f"the node of every worker serving {model!r} left the cluster: "
                                f"{', '.join(left)}", retry_after_s=NODE_POLL_S * 5)
        return WorkerFailed(f"every worker serving {model!r} failed for good: {', '.join(devices)}")

    async def wait_for_device(self, model: str, deadline: float) -> None:
        """A request whose model only restarting devices host waits for one of them (bounded:
        the restart's expected time and the request's deadline); then it is routed as usual."""
        if self.control.hosting_up(model):
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

    def _expected_restart_s(self, devices: list[str]) -> float:
        """A bounded guess of when a restarting device is back: backoff plus its start time."""
        guess = min(self.restarts.delay(d) + self._start_s.get(d, 5.0) for d in devices)
        return min(MAX_RESTART_WAIT_S, guess * 1.5 + 1.0)

    def topology(self) -> Topology:
        states = self.worker_states()
        device_nodes = {d: wc.device.node for d, wc in self._worker_configs.items() if d in self.links}
        nodes = {n: True for n in device_nodes.values()} | self.launcher.nodes()
        return Topology(nodes, device_nodes, {d: st == "up" for d, st in states.items()})

    def nodes_view(self, resident: dict[str, list[str]]) -> dict:
        """node -> whether it is in the cluster, its devices (worker state) and the models
        resident on each of them."""
        t, states = self.topology(), self.worker_states()
        return {node: {"up": up,
                       "devices": {d: states[d] for d, n in t.device_nodes.items() if n == node},
                       "placement": {d: sorted(m for m, ds in resident.items() if d in ds)
                                     for d, n in t.device_nodes.items() if n == node}}
                for node, up in t.nodes.items()}

    def workers_view(self) -> dict:
        return {d: {"state": s, "restarts": self.restarts.attempts(d)} for d, s in self.worker_states().items()}

    # ---- a dead worker is started again ----------------------------------------------------
    def worker_failed(self, device: str, message: str) -> None:
        """`device`'s worker is gone: out of routing and placement, and restarted (the router
        fails the requests it had)."""
        log.error("worker %s failed: %s", device, message)
        self.links[device].alive = False
        self.control.mark_down(device)
        if self._closed or device in self._restarting or self._loop is None:
            return
        self._restarting[device] = asyncio.Event()
        self.metrics.worker_deaths[device] += 1
        self._spawn(self._restart(device), f"restart-{device}")

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
        self._spawn(self._join(device, returning), f"join-{device_id}")

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


def _device_log(path: str | None, device: str) -> str | None:
    if path is None:
        return None
    stem, dot, ext = path.rpartition(".")
    slug = device.replace(":", "").replace("/", "-")
    return f"{stem}-{slug}.{ext}" if dot else f"{path}-{slug}"
