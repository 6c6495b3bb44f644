"""The frontend's side of one device worker: start it, send to it, and hand what it says to
the asyncio loop. A small interface on purpose: a later transport (Ray, other hosts) only has
to offer `send`, `close`, `ready` and deliver messages to `on_message` the same way."""
from __future__ import annotations

import asyncio
import threading
from typing import Callable

from prism.worker import messages as msg
from prism.worker.device_core import WorkerConfig
from prism.worker.process import WorkerProcess

OnMessage = Callable[[str, object], None]


class WorkerLink:
    def __init__(self, device_id: str, config: WorkerConfig):
        self.device_id = device_id
        self.process = WorkerProcess(config)  # blocks until the worker is ready (or raises)
        self.ready: msg.Ready = self.process.ready
        self.report: msg.DeviceMemory | None = None  # the latest memory report
        self.alive = True
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, on_message: OnMessage) -> None:
        """Start delivering this worker's messages to on_message, on the loop's thread."""

        def pump():
            while not self._closing.is_set():
                m = self.process.recv(timeout_s=0.1)
                if m is None:
                    continue
                loop.call_soon_threadsafe(on_message, self.device_id, m)
                if isinstance(m, msg.Failed):  # the process is gone
                    return

        self._thread = threading.Thread(target=pump, name=f"link-{self.device_id}", daemon=True)
        self._thread.start()

    def send(self, message) -> None:
        if self.alive:
            self.process.send(message)

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.alive = False
        self.process.close()
