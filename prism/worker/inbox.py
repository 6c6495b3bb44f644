"""A worker's inbox, read on a thread of its own so each message is dated when it reaches
the device, not when the worker's loop gets to it.

The loop reads its messages between steps. A request that comes while a step runs would
otherwise be dated from that step's end: its deadline would start late by the rest of the
step, unseen by every policy. The thread only receives and stamps; the loop decodes and
carries out the messages as before, in the order they came.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import zmq

POLL_S = 0.1  # how often the reading thread looks up to see whether it should stop


class StampedInbox:
    """Owns `socket` (ZeroMQ sockets are not thread-safe: nothing else may read it) until
    `close`. `clock`: the device's clock, the one its deadlines use."""

    def __init__(self, socket: zmq.Socket, clock: Callable[[], float]):
        self._socket = socket
        self._clock = clock
        self._received: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="prism-inbox", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if self._socket.poll(int(POLL_S * 1000)):
                self._received.put((self._clock(), self._socket.recv()))

    def get(self, timeout_s: float) -> tuple[float, bytes] | None:
        """The next message and when it came, waiting up to `timeout_s` (0: no wait); None if none."""
        try:
            return self._received.get(timeout=timeout_s) if timeout_s > 0 else self._received.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop reading (within POLL_S); the socket is the caller's again."""
        self._stop.set()
        self._thread.join()
