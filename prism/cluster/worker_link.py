"""The frontend's side of one device worker: start it, send to it, and hand what it says to
the asyncio loop. A small interface on purpose: a later transport (Ray, other hosts) only has
to offer `send`, `close`, `ready` and deliver messages to `on_message` the same way."""
from __future__ import annotations

import asyncio
from typing import Callable

from prism.worker import messages as msg
from prism.worker.device_core import WorkerConfig
from prism.worker.process import WorkerProcess

OnMessage = Callable[[str, object], None]
# A worker that dies says nothing: the receiving task checks the process this often while the
# socket is quiet (a message wakes it at once either way).
LIVENESS_CHECK_S = 0.5


class WorkerLink:
    def __init__(self, device_id: str, config: WorkerConfig):
        self.device_id = device_id
        self.process = WorkerProcess(config)  # blocks until the worker is ready (or raises)
        self.ready: msg.Ready = self.process.ready
        self.report: msg.DeviceMemory | None = None  # the latest memory report
        self.alive = True
        self._receiver: asyncio.Task | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, on_message: OnMessage) -> None:
        """Start delivering this worker's messages to on_message: a task on `loop`, which
        must be the running one (the socket is read with zmq.asyncio on it)."""
        self._receiver = loop.create_task(self._receive(on_message), name=f"link-{self.device_id}")

    async def _receive(self, on_message: OnMessage) -> None:
        while True:
            m = await self.process.recv_async(timeout_s=LIVENESS_CHECK_S)
            if m is None:
                continue
            on_message(self.device_id, m)
            if isinstance(m, msg.Failed):  # the process is gone
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
