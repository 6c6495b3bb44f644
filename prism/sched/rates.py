"""Per-model token and request rates over a sliding time window.

One tracker class for every rate a system needs, fed by arrivals wherever they happen (the
server's router, the simulator's frontend, each device as requests reach it): the global
scheduler's token rates (KV pressure), the request rates a placement made once is computed
from (`placement_rates`), and the request rates MuxServe's quotas follow (the `adbs` local
policy, fed by the device's own arrivals).

The global scheduler's KV pressure ratio needs each model's token rate: how many tokens per
second its requests bring. This tracker keeps, per model, the (time, tokens) of each request
recorded within the last `window_s` seconds and a running sum, so a rate is a division and
pruning costs O(1) amortized (each entry is appended once and popped once).

Which call the server should use: `record_arrival`, once per request as it arrives, with its
prompt length and `max_tokens`. Arrivals are what predicts KV demand: a request holds KV for
its prompt and, in the worst case, `max_tokens` outputs, from the moment it is admitted, and a
burst shows up at once instead of only when its requests finish. `record_completion` (actual
output length, recorded when the request ends) is the alternative for offline replay where
the true lengths are known; use one or the other per request, never both, or tokens and
requests count twice. `last_seen` is then the latest arrival, which is what `ClusterView.
last_request` wants.

Time is passed in (`now`), never read from a wall clock. Per model it must not go back:
records arrive in time order (a monotonic clock, or the simulator's event order), and a query
prunes entries for good, so a later query with an earlier `now` would see too little.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class TokenRateTracker:
    """Tokens/s and requests/s per model over the window (now - window_s, now]."""

    def __init__(self, window_s: float = 60.0) -> None:
        if not window_s > 0:
            raise ValueError(f"the rate window must be > 0 s, got {window_s}")
        self.window_s = float(window_s)
        self._entries: dict[str, deque[tuple[float, int]]] = {}  # model -> (time, tokens), oldest first
        self._num_tokens: dict[str, int] = {}  # model -> sum of tokens of its entries (ints: no drift)
        self._last_seen: dict[str, float] = {}

    # ---- recording ----------------------------------------------------------------------
    def record(self, model_id: str, now: float, num_tokens: int) -> None:
        """One request of `model_id` with `num_tokens` tokens, at time `now`."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens} for {model_id!r}")
        last = self._last_seen.get(model_id)
        if last is not None and now < last:
            raise ValueError(f"records of {model_id!r} must come in time order: {now} < {last}")
        entries = self._entries.setdefault(model_id, deque())
        entries.append((now, int(num_tokens)))
        self._num_tokens[model_id] = self._num_tokens.get(model_id, 0) + int(num_tokens)
        self._last_seen[model_id] = now

    def record_arrival(self, model_id: str, now: float, num_prompt_tokens: int, max_tokens: int) -> None:
        """A request arrives: count its prompt and the most it may generate (what the server
        should call; see the module notes)."""
        self.record(model_id, now, num_prompt_tokens + max_tokens)

    def record_completion(self, model_id: str, now: float, num_prompt_tokens: int,
                          num_output_tokens: int) -> None:
        """A request ends with its actual output length (instead of, never as well as, its
        arrival)."""
        self.record(model_id, now, num_prompt_tokens + num_output_tokens)

    # ---- queries ------------------------------------------------------------------------
    def rate(self, model_id: str, now: float) -> float:
        """Tokens per second of `model_id` over the window ending at `now`. Divided by the
        whole window even in the first `window_s` seconds after start: an early single
        request must not read as a huge rate."""
        self._prune(model_id, now)
        return self._num_tokens.get(model_id, 0) / self.window_s

    def request_rate(self, model_id: str, now: float) -> float:
        """Requests per second of `model_id` over the window ending at `now`."""
        self._prune(model_id, now)
        return len(self._entries.get(model_id, ())) / self.window_s

    def last_seen(self, model_id: str) -> float | None:
        """Time of the latest record of `model_id` (None: never), however old."""
        return self._last_seen.get(model_id)

    def models(self) -> tuple[str, ...]:
        """Every model ever recorded, sorted."""
        return tuple(sorted(self._last_seen))

    def token_rates(self, now: float) -> dict[str, float]:
        """`rate` of every model ever recorded: `ClusterView.token_rates`."""
        return {model_id: self.rate(model_id, now) for model_id in self.models()}

    def request_rates(self, now: float) -> dict[str, float]:
        """`request_rate` of every model ever recorded."""
        return {model_id: self.request_rate(model_id, now) for model_id in self.models()}

    def last_requests(self) -> dict[str, float]:
        """`last_seen` of every model ever recorded: `ClusterView.last_request`."""
        return dict(self._last_seen)

    def _prune(self, model_id: str, now: float) -> None:
        # An entry counts while now - t < window_s; exactly window_s old, it is out.
        entries = self._entries.get(model_id)
        if not entries:
            return
        horizon = now - self.window_s
        dropped = 0
        while entries and entries[0][0] <= horizon:
            dropped += entries.popleft()[1]
        if dropped:
            self._num_tokens[model_id] -= dropped


def window_request_rates(arrivals: Iterable[tuple[str, float]], window_s: float) -> dict[str, float]:
    """Requests/s per model over the first `window_s` seconds of `arrivals` ((model, time), in
    time order from 0), measured by the tracker: what a deployment that watched its traffic
    that long before placing its models knows. (A run shorter than the window is still divided
    by the whole window, as the tracker always does: rates are compared with each other.)"""
    tracker = TokenRateTracker(window_s)
    last = 0.0
    for model_id, t in arrivals:
        if t < window_s:
            tracker.record(model_id, t, 0)
            last = max(last, t)
    # Asked at the last early arrival, the window reaches back past 0: every one counts.
    return tracker.request_rates(last)


def placement_rates(models: Iterable[str], overrides: dict[str, float],
                    measured: dict[str, float] | None, window_s: float | None = None) -> dict[str, float]:
    """Requests/s to place by, per model: the config's `rate:` where set; else the measured
    rate; a model measured with no request at all counts as one request in the window (a
    placement must leave it some room); without any measurement (a server at start), 1.0
    for every model not overridden: equal rates."""
    out = {}
    for m in models:
        if m in overrides:
            out[m] = overrides[m]
        elif measured is None:
            out[m] = 1.0
        else:
            out[m] = measured.get(m) or (1.0 / window_s if window_s else 1.0)
    return out


__all__ = ["TokenRateTracker", "placement_rates", "window_request_rates"]
