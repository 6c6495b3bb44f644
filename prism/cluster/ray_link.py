"""Device workers on a Ray cluster (`prism serve --ray`): one Ray actor per device, pinned to
its node, running the very worker loop of a local worker process (prism.worker.process.
run_worker) behind the same typed ZeroMQ messages, over TCP instead of IPC.

The only module that imports Ray; the router imports it lazily, so single-host mode never
loads Ray. Torch-free on the driver's side: the actor's process imports the engine.

How a config's node names map to Ray nodes: a node started with the custom resource
`prism-node-<name>` (`ray start --resources '{"prism-node-a": 1}'`) is node `<name>`; a node
without one is `node-<first 8 hex digits of its Ray node id>` (fine for `ray.auto_devices`,
not stable across a node's restarts). Devices without a node run on the driver's node.
A worker actor is pinned with a hard NodeAffinitySchedulingStrategy to the node its name
resolves to when it starts (so a restart lands on the same node while it lives) and asks for
`ray.worker_cpus` CPUs and, for a cuda device, one GPU: Ray then shows it that GPU alone
(CUDA_VISIBLE_DEVICES), and the actor runs it as its cuda:0.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import uuid
from dataclasses import replace

import ray
import zmq
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from prism.cluster.config import ClusterConfig, RayConfig
from prism.cluster.worker_link import NodeGone
from prism.config import DeviceConfig
from prism.errors import UserError, one_line
from prism.worker import messages as msg
from prism.worker.channel import WorkerChannel, WorkerStartError
from prism.worker.device_core import WorkerConfig

log = logging.getLogger("prism.ray")
NODE_RESOURCE_PREFIX = "prism-node-"
SHM = "/dev/shm"  # where a node's workers share host copies of weights
SHUTDOWN_WAIT_S = 5.0  # for a live worker to leave its loop after Shutdown before it is killed


def node_name(node: dict) -> str:
    """A Ray node's Prism name (see the module's docstring)."""
    names = sorted(r[len(NODE_RESOURCE_PREFIX):] for r in node.get("Resources", {}) if r.startswith(NODE_RESOURCE_PREFIX))
    return names[0] if names else f"node-{node['NodeID'][:8]}"


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """A host:port that answers nothing is a one-line error now (ray.init would retry for minutes)."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise UserError(f"--ray {address}: no Ray cluster answers there ({one_line(e)})") from None


def _has_prism_name(node: dict) -> bool:
    return any(r.startswith(NODE_RESOURCE_PREFIX) for r in node.get("Resources", {}))


# ---- the actor, on its node ------------------------------------------------------------------
@ray.remote(max_restarts=0)  # the router restarts workers itself (RestartBudget), on the same node
class DeviceActor:
    def __init__(self, bind_host: str):
        host = ray.util.get_node_ip_address() if bind_host == "node" else bind_host
        self._ctx = zmq.Context()
        self._inbox, self._outbox = self._ctx.socket(zmq.PULL), self._ctx.socket(zmq.PUSH)
        port_in = self._inbox.bind_to_random_port(f"tcp://{host}")
        port_out = self._outbox.bind_to_random_port(f"tcp://{host}")
        self._addresses = (f"tcp://{host}:{port_in}", f"tcp://{host}:{port_out}")

    def addresses(self) -> tuple[str, str]:
        return self._addresses

    def run(self, config: WorkerConfig, idle_tick_s: float) -> None:
        """The worker's whole life: Ready, then steps until Shutdown (or the actor is killed)."""
        from prism.worker.process import run_worker

        if config.device.is_cuda:  # Ray shows this actor its one GPU only
            config = replace(config, device=replace(config.device, device="cuda:0"))
        try:
            run_worker(config, self._inbox, self._outbox, idle_tick_s)
        finally:
            self._inbox.close(linger=0)
            self._outbox.close(linger=2000)
            self._ctx.term()


# ---- the driver's side -----------------------------------------------------------------------
class RayWorker:
    """The frontend's handle on one worker actor (a `WorkerHandle`)."""

    def __init__(self, config: WorkerConfig, node_id: str, settings: RayConfig, idle_tick_s: float = 0.05):
        device_id = config.device.device_id
        self._closed = False
        self._run = None
        self.channel: WorkerChannel | None = None
        self._actor = DeviceActor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            num_cpus=settings.worker_cpus, num_gpus=1 if config.device.is_cuda else 0,
        ).remote(settings.bind_host)
        try:
            addr_in, addr_out = ray.get(self._actor.addresses.remote(), timeout=settings.start_timeout_s)
        except Exception as e:  # unschedulable, its node gone, no answer in time
            self.close()
            raise WorkerStartError(f"worker actor for {device_id} did not start: {one_line(e)}") from None
        self.channel = WorkerChannel(addr_in, addr_out, bind=False, peer_gone=self._gone)
        self._run = self._actor.run.remote(config, idle_tick_s)
        try:
            self.ready = self.channel.wait_ready(device_id, settings.start_timeout_s)
        except WorkerStartError:
            self.close()
            raise
        self.send, self.recv_async = self.channel.send, self.channel.recv_async

    def _gone(self) -> str | None:
        """Ray's word on the actor: None while its run is going, else why it ended."""
        done, _ = ray.wait([self._run], timeout=0, fetch_local=False)
        if not done:
            return None
        try:
            ray.get(self._run)
            return "the worker actor stopped"
        except ray.exceptions.RayError as e:
            return f"the worker actor died: {str(e).strip().splitlines()[0]}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.channel is not None:
            if self._run is not None and self._gone() is None:  # let it free its device first
                self.channel.send(msg.Shutdown())
                ray.wait([self._run], timeout=SHUTDOWN_WAIT_S, fetch_local=False)
            self.channel.close()
        ray.kill(self._actor)


class RayLauncher:
    """Device workers as Ray actors (a `Launcher`): joins (or starts) the cluster, keeps a view
    of its nodes, and says which devices to run: those the config lists on nodes that are
    alive, plus `ray.auto_devices` on every alive node."""

    def __init__(self, config: ClusterConfig, address: str | None = None):
        self._settings = config.ray
        self._configured = config.devices
        address = address or config.ray.address
        _check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"--ray: no Ray cluster at {address or 'RAY_ADDRESS or a new local one'}: {one_line(e)}") from None
        self._driver_node = ray.get_runtime_context().get_node_id()
        self._store_name = f"prism-host-copies-{uuid.uuid4().hex[:12]}"
        self._store_nodes: set[str] = set()
        self._alive: dict[str, dict] = {}  # node name -> its ray.nodes() entry
        self._seen: set[str] = {d.node for d in config.devices}
        self._unnamed_here = "" in self._seen  # some device names no node: it runs on the driver's
        self.refresh()

    @property
    def silence_timeout_s(self) -> float:
        return self._settings.silence_timeout_s

    def refresh(self) -> None:
        alive = {}
        for node in ray.nodes():
            if node["Alive"]:
                name = node_name(node)
                if node["NodeID"] == self._driver_node and self._unnamed_here and not _has_prism_name(node):
                    name = ""  # the driver's unnamed node is where the devices that name no node run
                alive[name] = node
        if self._unnamed_here and "" not in alive:  # the driver's node has a name: "" is another
            driver = [n for n in alive.values() if n["NodeID"] == self._driver_node]
            alive.update({"": driver[0]} if driver else {})
        self._alive = alive
        self._seen |= alive.keys()

    def nodes(self) -> dict[str, bool]:
        return {name: name in self._alive for name in sorted(self._seen)}

    def devices(self) -> list[DeviceConfig]:
        wanted = [d for d in self._configured if d.node in self._alive]
        auto = self._settings.auto_devices
        if auto is not None:
            listed, nodes_done = {d.device_id for d in wanted}, set()
            for name, node in sorted(self._alive.items(), key=lambda item: (item[0] == "", item[0])):
                if node["NodeID"] in nodes_done:  # the driver's node under its second name, ""
                    continue
                nodes_done.add(node["NodeID"])
                count = int(node["Resources"].get("GPU", 0)) if auto.device == "cuda" else 1
                for i in range(count):
                    kind = f"cuda:{i}" if auto.device == "cuda" else "cpu"
                    d = DeviceConfig(kind, auto.memory_bytes, auto.page_size, auto.num_spare_pages, node=name)
                    if d.device_id not in listed:
                        wanted.append(d)
        return wanted

    def start(self, config: WorkerConfig) -> RayWorker:
        self.refresh()  # the node as it is now: a restart goes to the same node while it lives
        node = self._alive.get(config.device.node)
        if node is None:
            raise NodeGone(f"node {config.device.node!r} of {config.device.device_id} is not in the Ray cluster")
        return RayWorker(config, node["NodeID"], self._settings)

    def host_copy_dir(self, node: str) -> str | None:
        """The folder (on that node's /dev/shm) where the node's workers share host copies;
        one per node even where nodes share a machine, removed on each node at close."""
        self._store_nodes.add(node)
        return self._store_folder(node)

    def _store_folder(self, node: str) -> str:
        return f"{SHM}/{self._store_name}/{node or 'driver'}"

    def close(self) -> None:
        self.refresh()
        removals = [_remove_folder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                                           num_cpus=0).remote(self._store_folder(name))
                    for name, n in self._alive.items() if name in self._store_nodes]
        try:  # a node that left took its /dev/shm folder's memory with it only if it restarts
            ray.get(removals, timeout=SHUTDOWN_WAIT_S)
        except ray.exceptions.RayError as e:
            log.warning("host copies not removed on every node: %s", one_line(e))
        ray.shutdown()


@ray.remote
def _remove_folder(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):  # the server's folder, once its last node's is gone
        os.rmdir(os.path.dirname(path))


__all__ = ["NODE_RESOURCE_PREFIX", "DeviceActor", "RayLauncher", "RayWorker", "node_name"]
