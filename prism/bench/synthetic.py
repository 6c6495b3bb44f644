"""Synthetic many-model traces: power-law model popularity, Gamma inter-arrivals (burstiness as
a coefficient of variation) and optional on/off periods per model — the knobs multi-model
serving papers (AlpaServe, MuxServe) sweep. Deterministic for a seed."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prism.bench.trace import TraceRequest
from prism.errors import UserError

LengthSpec = tuple[int, int] | Sequence[tuple[int, int]]


def popularity_weights(num_models: int, alpha: float) -> np.ndarray:
    """Share of requests of model k (0-based): (1/(k+1)^alpha), normalised to sum to 1."""
    w = 1.0 / np.arange(1, num_models + 1, dtype=float) ** alpha
    return w / w.sum()


def _is_range(spec) -> bool:
    return (isinstance(spec, tuple) and len(spec) == 2
            and all(isinstance(x, (int, np.integer)) for x in spec))


def _length_sampler(input_lens: LengthSpec, output_lens: LengthSpec | None):
    """Returns draw(rng, n) -> (inputs, outputs) arrays."""
    if _is_range(input_lens):
        if not _is_range(output_lens):
            raise UserError(f"input_lens is a (lo, hi) range, so output_lens must be one too, "
                             f"got {output_lens!r}")
        (ilo, ihi), (olo, ohi) = input_lens, output_lens
        if not (1 <= ilo <= ihi and 1 <= olo <= ohi):
            raise UserError(f"length ranges need 1 <= lo <= hi, got input {input_lens}, "
                             f"output {output_lens}")

        def draw(rng, n):
            return rng.integers(ilo, ihi + 1, n), rng.integers(olo, ohi + 1, n)
        return draw
    if output_lens is not None:
        raise UserError("with a list of (input, output) samples as input_lens, output_lens "
                         "must be None")
    try:
        samples = np.asarray([(int(i), int(o)) for i, o in input_lens], dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError("input_lens must be a (lo, hi) range or a list of (input, output) "
                         "pairs") from None
    if len(samples) == 0 or samples.min() < 1:
        raise UserError("length samples must be non-empty with lengths >= 1")

    def draw(rng, n):
        idx = rng.integers(0, len(samples), n)
        return samples[idx, 0], samples[idx, 1]
    return draw


def gamma_gaps(rng: np.random.Generator, rate: float, cv: float, n: int) -> np.ndarray:
    """n inter-arrival gaps with mean 1/rate and coefficient of variation cv (Gamma with shape
    1/cv^2; cv=1 is exponential, i.e. Poisson arrivals; cv=0 is a fixed interval)."""
    if cv == 0:
        return np.full(n, 1.0 / rate)
    shape = 1.0 / cv**2
    return rng.gamma(shape, 1.0 / (rate * shape), n)


def _renewal_times(rng: np.random.Generator, rate: float, cv: float, horizon: float) -> np.ndarray:
    """Arrival times in [0, horizon) of a renewal process with Gamma(rate, cv) gaps."""
    if rate <= 0 or horizon <= 0:
        return np.empty(0)
    chunks, t, expected = [], 0.0, rate * horizon
    while True:
        n = max(16, int(expected * 1.1 + 4 * np.sqrt(expected + 1)))
        times = t + np.cumsum(gamma_gaps(rng, rate, cv, n))
        chunks.append(times)
        if times[-1] >= horizon:
            break
        t = times[-1]
    times = np.concatenate(chunks)
    return times[times < horizon]


def _on_periods(rng: np.random.Generator, mean_on: float, mean_off: float,
                duration: float) -> list[tuple[float, float]]:
    """Alternating on/off periods with exponential lengths over [0, duration), starting in a
    state drawn from the stationary split (memorylessness makes the first period's residual
    length exponential too). Returns the on periods as (start, end) wall times."""
    on = rng.random() < mean_on / (mean_on + mean_off)
    t, periods = 0.0, []
    while t < duration:
        length = rng.exponential(mean_on if on else mean_off)
        if on:
            periods.append((t, min(t + length, duration)))
        t += length
        on = not on
    return periods


def _model_arrivals(rng: np.random.Generator, rate: float, cv: float, duration: float,
                    on_off: tuple[float, float] | None) -> np.ndarray:
    if on_off is None:
        return _renewal_times(rng, rate, cv, duration)
    mean_on, mean_off = on_off
    periods = _on_periods(rng, mean_on, mean_off, duration)
    if not periods:
        return np.empty(0)
    # The arrival process runs on a clock that only ticks while on, at the rate that keeps the
    # long-run average at `rate`; map that clock back to wall time by skipping off periods.
    on_rate = rate * (mean_on + mean_off) / mean_on
    starts = np.array([s for s, _ in periods])
    lengths = np.array([e - s for s, e in periods])
    cum = np.concatenate([[0.0], np.cumsum(lengths)])
    times = _renewal_times(rng, on_rate, cv, cum[-1])
    idx = np.searchsorted(cum, times, side="right") - 1
    return starts[idx] + (times - cum[idx])


def synthetic_trace(num_models: int, duration_s: float, total_rate: float, alpha: float = 1.0,
                    cv: float = 1.0, input_lens: LengthSpec = (128, 1024),
                    output_lens: LengthSpec | None = (16, 256),
                    on_off: tuple[float, float] | None = None, seed: int = 0,
                    model_names: list[str] | None = None) -> list[TraceRequest]:
    """A trace of `num_models` models over [0, duration_s) at `total_rate` requests/s in all.

    - Popularity: model k (0-based, named model_names[k], default "m{k}") gets the share
      1/(k+1)^alpha of the rate, normalised (alpha=0: equal shares).
    - Burstiness: each model's inter-arrival gaps are Gamma with coefficient of variation
      `cv` (cv=1: Poisson; > 1 burstier; 0: evenly spaced).
    - on_off=(mean_on_s, mean_off_s): each model alternates exponentially long on and off
      periods and sends only while on; the on-rate is raised by (on+off)/on so the long-run
      rate (and so the expected count) stays the same.
    - Lengths: input_lens and output_lens as inclusive (lo, hi) ranges drawn uniformly, or
      input_lens as a list of (input, output) samples drawn with replacement (output_lens
      None), e.g. [(r.input_len, r.output_len) for r in load_azure("conv")].

    The same arguments and seed give the same trace. Each model draws from its own stream,
    so changing one model's parameters does not reshuffle the others."""
    if not isinstance(num_models, (int, np.integer)) or num_models < 1:
        raise UserError(f"num_models must be a positive integer, got {num_models!r}")
    if not duration_s > 0:
        raise UserError(f"duration_s must be > 0, got {duration_s}")
    if not total_rate > 0:
        raise UserError(f"total_rate must be > 0, got {total_rate}")
    if not alpha >= 0:
        raise UserError(f"alpha must be >= 0, got {alpha}")
    if not cv >= 0:
        raise UserError(f"cv must be >= 0, got {cv}")
    if on_off is not None:
        if len(on_off) != 2 or not (on_off[0] > 0 and on_off[1] >= 0):
            raise UserError(f"on_off must be (mean_on > 0, mean_off >= 0) seconds, got {on_off}")
        if on_off[1] == 0:
            on_off = None
    if model_names is None:
        model_names = [f"m{k}" for k in range(num_models)]
    if len(model_names) != num_models or len(set(model_names)) != num_models:
        raise UserError(f"need {num_models} distinct model names, got {model_names}")
    draw_lengths = _length_sampler(input_lens, output_lens)

    rates = total_rate * popularity_weights(num_models, alpha)
    out = []
    for k, (name, rate) in enumerate(zip(model_names, rates)):
        rng = np.random.default_rng([seed, k])
        times = _model_arrivals(rng, rate, cv, duration_s, on_off)
        ins, outs = draw_lengths(rng, len(times))
        out.extend(TraceRequest(float(t), name, int(i), int(o)) for t, i, o in zip(times, ins, outs))
    return sorted(out, key=lambda r: r.arrival_s)
