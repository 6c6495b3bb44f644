"""One record per request of a run, real (the HTTP replay client) or simulated: the format
every report, plot and comparison reads (JSON lines)."""
from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from prism.errors import UserError

# A request still unfinished this long after it was sent is given up (an error, a miss): the
# replay client's default, and the simulator's, so both judge the same way.
DEFAULT_REQUEST_TIMEOUT_S = 300.0


@dataclass
class RequestRecord:
    index: int
    model: str
    input_len: int
    output_len: int
    arrival_s: float  # scheduled, from the replay start
    send_s: float | None = None  # actual, from the replay start
    token_s: list[float] = field(default_factory=list)  # each token's arrival, from the replay start
    finish_s: float | None = None
    finish_reason: str | None = None
    num_output_tokens: int | None = None  # from the final usage chunk
    error: str | None = None
    prompt_kind: str | None = None  # "ids", "text" or "given" (the trace's own text)

    @property
    def ttft(self) -> float | None:
        return self.token_s[0] - self.send_s if self.token_s and self.send_s is not None else None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, as commonly defined (vLLM's benchmarks,
        DistServe): (finish - first token) / (output tokens - 1); none for one-token outputs
        or unfinished requests. Streamed chunks can carry no text for some tokens (held-back
        bytes, skipped specials), so the count comes from usage."""
        n = self.num_output_tokens or len(self.token_s)
        if not self.token_s or self.finish_s is None or n < 2:
            return None
        return (self.finish_s - self.token_s[0]) / (n - 1)

    @property
    def e2e(self) -> float | None:
        """Send to finish, for finished requests."""
        return self.finish_s - self.send_s if self.ok and self.finish_s is not None and self.send_s is not None else None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None



def read_text(path: str | Path) -> str:
    """A text file's content; `.gz` files (archived records and step logs) are decompressed."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as f:
            return f.read()
    return path.read_text()


def save_records(path: str | Path, records: list[RequestRecord]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))


def load_records(path: str | Path) -> list[RequestRecord]:
    """Records saved by save_records (unknown keys, e.g. from newer versions, are ignored)."""
    path = Path(path)
    known = {f.name for f in fields(RequestRecord)}
    try:
        lines = read_text(path).splitlines()
    except FileNotFoundError:
        raise UserError(f"records file not found: {path}") from None
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(RequestRecord(**{k: v for k, v in row.items() if k in known}))
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"{path}: line {i + 1} is not a request record: {e}") from None
    return out
