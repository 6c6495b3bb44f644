"""The frontend's side of one device worker: start it, send to it, and hand what it says to
the asyncio loop, whatever runs the worker.

Two transports sit behind one small protocol (`WorkerHandle`): a child process on this host
over ZeroMQ IPC (`prism.worker.process.WorkerProcess`) and a Ray actor pinned to a node over
ZeroMQ TCP (`prism.cluster.ray_link`). A `Launcher` starts handles and says which devices
exist and which nodes are alive; the router uses only these two protocols, so it does not
care which transport carries a device.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

from prism.config import DeviceConfig
from prism.worker import messages as msg
from prism.worker.channel import WorkerStartError
from prism.worker.device_core import WorkerConfig
from prism.worker.process import WorkerProcess

OnMessage = Callable[[str, object], None]
# A worker that dies says nothing: the receiving task asks its handle whether the peer is gone
# this often while the socket is quiet (a message wakes it at once either way).
LIVENESS_CHECK_S = 0.5


class NodeGone(WorkerStartError):
    """A device's node is not (or no longer) in the cluster: its worker waits for the node."""


class WorkerHandle(Protocol):
    """One started worker: its Ready, typed messages both ways, and a way to stop it."""

    ready: msg.Ready

    def send(self, message) -> bool: ...

    async def recv_async(self, timeout_s: float): ...  # a message, None (quiet) or Failed (gone)

    def close(self) -> None: ...


class Launcher(Protocol):
    """Where device workers run: which devices there are now and how to start one."""

    # A worker silent this long (no answer to the reports asked for every tick) is taken for
    # lost; None: the handle's own liveness check is enough (a local process).
    silence_timeout_s: float | None

    def devices(self) -> list[DeviceConfig]: ...  # the devices to run now (their nodes alive)

    def nodes(self) -> dict[str, bool]: ...  # node name -> alive, as of the latest refresh

    def refresh(self) -> None: ...  # look at the cluster again (blocking: not on the event loop)

    def start(self, config: WorkerConfig) -> WorkerHandle: ...  # blocks until Ready (or raises)

    def host_copy_dir(self, node: str) -> str | None: ...  # where a node's workers share weight copies

    def close(self) -> None: ...


class LocalLauncher:
    """Single-host mode: one spawned process per configured device; the one node is this host."""

    silence_timeout_s = None

    def __init__(self, devices: tuple[DeviceConfig, ...]):
        self._devices = list(devices)
        self._host_copies: str | None = None  # a folder of this server's, removed at close
        self._lock = threading.Lock()  # workers are configured from several threads at once

    def devices(self) -> list[DeviceConfig]:
        return self._devices

    def nodes(self) -> dict[str, bool]:
        return {d.node: True for d in self._devices}

    def refresh(self) -> None:
        pass

    def start(self, config: WorkerConfig) -> WorkerHandle:
        return WorkerProcess(config)

    def host_copy_dir(self, node: str) -> str | None:
        """One folder for every worker of this host (on /dev/shm where there is one): the
        devices share one host copy per evicted model instead of one each."""
        with self._lock:
            if self._host_copies is None:
                shm = Path("/dev/shm")
                self._host_copies = tempfile.mkdtemp(prefix="prism-host-copies-",
                                                     dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
            return self._host_copies

    def close(self) -> None:
        if self._host_copies is not None:  # the workers are gone: their mappings with them
            shutil.rmtree(self._host_copies, ignore_errors=True)


class WorkerLink:
    def __init__(self, device_id: str, handle: WorkerHandle, silence_timeout_s: float | None = None):
        self.device_id = device_id
        self.process = handle
        self.ready: msg.Ready = handle.ready
        self.report: msg.DeviceMemory | None = None  # the latest memory report
        self.alive = True
        self._silence_timeout_s = silence_timeout_s
        self._receiver: asyncio.Task | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, on_message: OnMessage) -> None:
        """Start delivering this worker's messages to on_message: a task on `loop`, which
        must be the running one (the socket is read with zmq.asyncio on it)."""
        self._receiver = loop.create_task(self._receive(on_message), name=f"link-{self.device_id}")

    async def _receive(self, on_message: OnMessage) -> None:
        heard = time.monotonic()
        while True:
            m = await self.process.recv_async(timeout_s=LIVENESS_CHECK_S)
            now = time.monotonic()
            if m is None:
                if self._silence_timeout_s is None or now - heard < self._silence_timeout_s:
                    continue
                # Alive as far as its transport knows, yet unheard (a partitioned node, a hung
                # step): lost all the same. close() stops whatever is left of it.
                m = msg.Failed(f"no word from the worker for {now - heard:.0f} s")
            heard = now
            on_message(self.device_id, m)
            if isinstance(m, msg.Failed):  # the worker is gone
                return

    def send(self, message) -> None:
        if self.alive:
            self.process.send(message)

    def close(self) -> None:
        receiver, self._receiver = self._receiver, None
        if receiver is not None and not receiver.done() and not receiver.get_loop().is_closed():
            receiver.cancel()
        self.alive = False
        self.process.close()
