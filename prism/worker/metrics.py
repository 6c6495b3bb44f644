"""What a device worker records: one line per finished request, one per device sample.

Both go to a JSON-lines file (when a path is given) and stay in memory for tests and the
admin view. Samples are taken after each step, but at most once per `sample_interval_s`.
"""
from __future__ import annotations

import json
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import msgspec

from prism.worker.messages import DeviceMemory


@dataclass
class DeviceCounters:
    activations: Counter = field(default_factory=Counter)  # per model
    evictions: Counter = field(default_factory=Counter)
    preemptions: Counter = field(default_factory=Counter)
    activation_seconds: Counter = field(default_factory=Counter)


class MetricsLog:
    def __init__(self, path: str | Path | None = None, sample_interval_s: float = 0.1,
                 keep_last: int = 10_000):
        self.sample_interval_s = sample_interval_s
        self.requests: deque[dict] = deque(maxlen=keep_last)
        self.samples: deque[dict] = deque(maxlen=keep_last)
        self._last_sample_time = float("-inf")
        self._file: IO[str] | None = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)

    def record_request(self, model_id: str, req_id: str, finish_reason: str, metrics: dict) -> None:
        line = {"kind": "request", "model": model_id, "req_id": req_id,
                "finish_reason": finish_reason, **metrics}
        self.requests.append(line)
        self._write(line)

    def due(self, now: float) -> bool:
        return now - self._last_sample_time >= self.sample_interval_s

    def record_sample(self, sample: DeviceMemory) -> None:
        self._last_sample_time = sample.time
        line = {"kind": "device", **msgspec.to_builtins(sample)}
        self.samples.append(line)
        self._write(line)

    def _write(self, line: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
