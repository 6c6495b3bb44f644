"""The frontend's two ZeroMQ sockets to one device worker, whatever carries them: IPC to a
child process on this host (the frontend binds), or TCP to a Ray actor on any node (the actor
binds on its node, the frontend connects). Typed msgspec messages both ways, never pickle.

Torch-free: the frontend imports it.
"""
from __future__ import annotations

import time
from typing import Callable

import msgspec
import zmq
import zmq.asyncio

from prism.errors import UserError
from prism.worker import messages as msg

ENCODER = msgspec.msgpack.Encoder()
READY_CHECK_S = 0.5  # while a worker starts, how often its liveness is checked
# Says why the peer is known to be gone (its process exited, its actor died), or None.
PeerGone = Callable[[], "str | None"]


class WorkerStartError(UserError, RuntimeError):
    """A worker could not start: its models or memory as configured (the message says which)."""


class WorkerChannel:
    def __init__(self, addr_in: str, addr_out: str, bind: bool, peer_gone: PeerGone):
        self._ctx = zmq.Context()
        self._to_worker = self._ctx.socket(zmq.PUSH)
        self._to_worker.setsockopt(zmq.SNDHWM, 0)  # no limit: see send
        self._from_worker = self._ctx.socket(zmq.PULL)
        for sock, addr in ((self._to_worker, addr_in), (self._from_worker, addr_out)):
            sock.bind(addr) if bind else sock.connect(addr)
        self._peer_gone = peer_gone
        self._decoder = msgspec.msgpack.Decoder(msg.FromWorker)
        self._from_worker_async: zmq.asyncio.Socket | None = None  # made on the loop that reads
        self._closed = False

    def send(self, message) -> bool:
        """Send without blocking; False when no worker is connected (it died: a blocking PUSH
        would then wait for ever, the caller's event loop with it). The high-water mark is
        off, so a slow but live worker never loses a message."""
        try:
            self._to_worker.send(ENCODER.encode(message), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def recv(self, timeout_s: float | None = None):
        """The next message from the worker, None after timeout_s (None: wait forever), or
        Failed once the peer is known to be gone."""
        timeout_ms = None if timeout_s is None else int(timeout_s * 1000)
        if not self._from_worker.poll(timeout_ms):
            return self._gone()
        return self._decoder.decode(self._from_worker.recv())

    async def recv_async(self, timeout_s: float):
        """As `recv`, awaited on an asyncio loop (zmq.asyncio: no thread, no busy polling)."""
        if self._from_worker_async is None:  # a view of the same socket, not a second one
            self._from_worker_async = zmq.asyncio.Socket.from_socket(self._from_worker)
        if not await self._from_worker_async.poll(int(timeout_s * 1000)):
            return self._gone()
        return self._decoder.decode(await self._from_worker_async.recv())

    def _gone(self):
        reason = self._peer_gone()
        return None if reason is None else msg.Failed(reason)

    def wait_ready(self, device_id: str, timeout_s: float) -> msg.Ready:
        """The worker's Ready, or WorkerStartError with its one-line reason (a peer that dies
        while starting is noticed within READY_CHECK_S, not at the timeout)."""
        deadline = time.monotonic() + timeout_s
        first = None
        while first is None and time.monotonic() < deadline:
            first = self.recv(timeout_s=min(READY_CHECK_S, max(0.0, deadline - time.monotonic())))
        if isinstance(first, msg.Ready):
            return first
        reason = first.message if isinstance(first, msg.Failed) else "no answer in time"
        raise WorkerStartError(f"worker for {device_id} did not start: {reason}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._to_worker.close(linger=0)
        self._from_worker.close(linger=0)
        self._ctx.term()
