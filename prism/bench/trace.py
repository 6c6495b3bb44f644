"""The plain trace format: one request per line (JSONL) or row (CSV).

Fields: arrival_s (seconds from the trace start), model, input_len, output_len, and an
optional prompt text. Loaders for public traces and generators write this format; the replay
client reads it.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from prism.errors import UserError


class TraceError(UserError):
    pass


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    model: str
    input_len: int
    output_len: int
    prompt: str | None = None

    def __post_init__(self):
        if self.arrival_s < 0 or self.input_len < 1 or self.output_len < 1:
            raise TraceError(f"bad trace request {self}: arrival >= 0 and lengths >= 1 required")


def save_trace(path: str | Path, requests: list[TraceRequest]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: v for k, v in asdict(r).items() if v is not None} for r in requests]
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["arrival_s", "model", "input_len", "output_len", "prompt"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def load_trace(path: str | Path) -> list[TraceRequest]:
    path = Path(path)
    try:
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise TraceError(f"trace file not found: {path}") from None
    except (json.JSONDecodeError, csv.Error) as e:
        raise TraceError(f"{path}: not a valid trace: {e}") from None
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(TraceRequest(float(row["arrival_s"]), str(row["model"]), int(row["input_len"]),
                                    int(row["output_len"]), row.get("prompt") or None))
        except (KeyError, TypeError, ValueError) as e:
            raise TraceError(f"{path}: request {i}: {e}") from None
    return sorted(out, key=lambda r: r.arrival_s)


def poisson_trace(models: dict[str, float], duration_s: float, input_lens: tuple[int, int],
                  output_lens: tuple[int, int], seed: int = 0) -> list[TraceRequest]:
    """Independent Poisson arrivals per model (rate in requests/s), uniform lengths in the
    given inclusive ranges. The simplest load; richer generators live beside it."""
    rng = random.Random(seed)
    out = []
    for model, rate in sorted(models.items()):
        t = rng.expovariate(rate) if rate > 0 else duration_s
        while t < duration_s:
            out.append(TraceRequest(t, model, rng.randint(*input_lens), rng.randint(*output_lens)))
            t += rng.expovariate(rate)
    return sorted(out, key=lambda r: r.arrival_s)
