"""Time estimates the policies plan with: measured model profiles, or defaults from model size.

Torch-free (policy side). A `ModelProfile` is what `prism profile` measured for one model on one
device (written by prism.engine.profiler); `ProfileCostModel` turns profiles into the
`prism.sched.view.CostModel` answers:

- prefill_time: piecewise-linear in the number of tokens between measured lengths.
  Measured times are first made non-decreasing (running maximum), so noise never makes a
  longer prompt look cheaper. Below the shortest measured length the first segment's line is
  used, never below the proportional line through the origin (so 0 tokens -> 0, never
  negative); past the longest, the last segment's slope, but at least the longest's average
  seconds per token (prefill is never cheaper per token for longer prompts).
- decode_step_time: a linear model  time = a + b * batch_size + c * total_context_tokens
  fitted to the measured (batch, context) grid by non-negative least squares on relative
  error (each point weighted 1/measured time, so small and large batches count alike; a, b,
  c >= 0 keeps it monotonic in batch and context). This is the roofline shape of a decode
  step: a fixed part (weights read once, launches), a per-sequence part (sampling, batch
  building) and a per-context-token part (KV read). The result is clamped below at the
  smallest measured step time. A profile with a single decode point scales the default shape
  below to pass through it.
- activation_time: weight bytes over the profile's host-to-device bandwidth (else default).
- mixed_step_time (the simulator's, when a profile measured mixed steps: one prefill chunk of
  P tokens beside a decode batch): the larger of the two parts alone, plus what mixing added
  beyond it, fitted like decode as a + b * batch + c * total_context (non-negative). An engine
  that runs both in one fused pass adds little; one that runs mixed batches sequence by
  sequence adds a lot per sequence. None when the profile has no mixed points.

Without a profile but with a known size (`set_model_size`), defaults from nominal device rates
(`DefaultCosts`): prefill = max(weights / memory bandwidth, 2 * params * tokens / flops) with
params = weight_bytes / 2 (16-bit weights, the serving dtype on GPUs; for float32 weights this
over-estimates compute by 2x, which errs on the safe side); decode step = (weights + KV of the
whole batch's context) / memory bandwidth; activation = weights / host-to-device bandwidth.
A model never registered at all gets small fixed costs (`DefaultCosts.unknown_*`): planning
goes on, and a warning is logged once per model.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from prism.errors import UserError
from prism.sched.view import CostModel

log = logging.getLogger(__name__)

PROFILE_VERSION = 1


# ---- profiles ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelProfile:
    """What one model measured on one device. Lists are stored as sorted tuples (immutable);
    any sequence of pairs/triples is accepted when constructing."""

    model: str  # the model's name as given to the engine (e.g. "llama-3.1-8b:random")
    device: str  # "cpu", "cuda:0"
    card: str  # the hardware: "NVIDIA H100 80GB HBM3", a CPU model name
    dtype: str  # "bfloat16", "float32"
    date: str  # ISO date of the measurement
    weight_bytes: int
    kv_bytes_per_token: int
    prefill: tuple[tuple[int, float], ...] = ()  # (num_tokens, seconds): one sequence, one chunk
    decode: tuple[tuple[int, int, float], ...] = ()  # (batch_size, context_len per seq, s/step)
    # (prefill tokens, decode batch, context per decoding seq, s/step): one prefill chunk
    # beside a decode batch in one step (optional: older profiles have none)
    mixed: tuple[tuple[int, int, int, float], ...] = ()
    h2d_bytes_per_s: float | None = None  # pinned host -> device copy rate, if measured

    def __post_init__(self):
        prefill = tuple(sorted((int(n), float(t)) for n, t in self.prefill))
        decode = tuple(sorted((int(b), int(c), float(t)) for b, c, t in self.decode))
        mixed = tuple(sorted((int(p), int(b), int(c), float(t)) for p, b, c, t in self.mixed))
        for p, b, c, t in mixed:
            _check(p >= 1 and b >= 1 and c >= 0 and math.isfinite(t) and t > 0,
                   f"bad mixed point ({p}, {b}, {c}, {t})")
        for n, t in prefill:
            _check(n >= 1 and math.isfinite(t) and t > 0, f"bad prefill point ({n}, {t})")
        for b, c, t in decode:
            _check(b >= 1 and c >= 0 and math.isfinite(t) and t > 0,
                   f"bad decode point ({b}, {c}, {t})")
        _check(self.weight_bytes >= 0 and self.kv_bytes_per_token >= 0, "negative sizes")
        if self.h2d_bytes_per_s is not None:
            h2d = float(self.h2d_bytes_per_s)
            _check(math.isfinite(h2d) and h2d > 0, f"bad h2d_bytes_per_s {h2d}")
            object.__setattr__(self, "h2d_bytes_per_s", h2d)
        object.__setattr__(self, "prefill", prefill)
        object.__setattr__(self, "decode", decode)
        object.__setattr__(self, "mixed", mixed)
        object.__setattr__(self, "weight_bytes", int(self.weight_bytes))
        object.__setattr__(self, "kv_bytes_per_token", int(self.kv_bytes_per_token))

    @property
    def prefill_tokens_per_s(self) -> tuple[tuple[int, float], ...]:
        return tuple((n, n / t) for n, t in self.prefill)

    def to_dict(self) -> dict:
        return {
            "version": PROFILE_VERSION,
            "model": self.model, "device": self.device, "card": self.card,
            "dtype": self.dtype, "date": self.date,
            "weight_bytes": self.weight_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
            "h2d_bytes_per_s": self.h2d_bytes_per_s,
            "prefill": [list(p) for p in self.prefill],
            "decode": [list(p) for p in self.decode],
            "mixed": [list(p) for p in self.mixed],
            # for people reading the file; ignored by from_dict
            "prefill_tokens_per_s": [[n, round(r, 1)] for n, r in self.prefill_tokens_per_s],
        }

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelProfile":
        if not isinstance(raw, dict):
            raise UserError("not a Prism model profile: expected a JSON object")
        version = raw.get("version", PROFILE_VERSION)
        if version != PROFILE_VERSION:
            raise UserError(f"unsupported profile version {version!r} (this Prism reads "
                             f"{PROFILE_VERSION})")
        try:
            h2d = raw.get("h2d_bytes_per_s")
            return cls(
                model=str(raw["model"]), device=str(raw["device"]), card=str(raw["card"]),
                dtype=str(raw["dtype"]), date=str(raw["date"]),
                weight_bytes=int(raw["weight_bytes"]),
                kv_bytes_per_token=int(raw["kv_bytes_per_token"]),
                prefill=[(p[0], p[1]) for p in raw.get("prefill", [])],
                decode=[(p[0], p[1], p[2]) for p in raw.get("decode", [])],
                mixed=[(p[0], p[1], p[2], p[3]) for p in raw.get("mixed", [])],
                h2d_bytes_per_s=None if h2d is None else float(h2d),
            )
        except KeyError as e:
            raise UserError(f"not a Prism model profile: missing key {e.args[0]!r}") from None
        except (TypeError, IndexError) as e:
            raise UserError(f"not a Prism model profile: bad value ({e})") from None

    def save(self, path: str | Path) -> Path:
        """Write as JSON (atomically: a reader never sees half a file); returns the path."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ModelProfile":
        path = Path(path).expanduser()
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"profile not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(raw)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"not a valid model profile: {message}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "x"


def default_profile_path(folder: str | Path, model: str, device: str) -> Path:
    """<folder>/<model-slug>-<device-slug>.json, e.g. llama-3.1-8b-random-cuda-0.json."""
    return Path(folder).expanduser() / f"{_slug(model)}-{_slug(device)}.json"


def load_profiles(folder: str | Path, device: str | None = None) -> dict[str, ModelProfile]:
    """Every profile in folder (prism.env.profile_dir() for the user's), keyed by model name; only those of
    `device` if given. Where one model has several, the latest date wins. Files that are not
    valid profiles are skipped with a warning; a missing folder gives {}."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return {}
    found: dict[str, ModelProfile] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            profile = ModelProfile.load(path)
        except (ValueError, OSError) as e:
            log.warning("skipping %s: %s", path, e)
            continue
        if device is not None and profile.device != device:
            continue
        old = found.get(profile.model)
        if old is None or profile.date >= old.date:
            found[profile.model] = profile
    return found


# ---- defaults ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DefaultCosts:
    """Nominal device rates for models without a profile.

    The defaults describe a CPU: 20 GB/s is what a dual-channel DDR4/DDR5 desktop or a small
    cloud VM sustains in a streaming read (STREAM-like; servers reach more), 200 GFLOP/s is a
    few cores of AVX2/AVX-512 FP32 GEMM, 10 GB/s a plain memcpy (or a PCIe 3 x16 link).
    `nvidia_h100()` gives GPU numbers. Profiles are always better: run `prism profile`.
    """

    memory_bytes_per_s: float = 20e9
    flops_per_s: float = 200e9
    h2d_bytes_per_s: float = 10e9
    # A model never registered (no profile, no size): small fixed costs, so planning goes on.
    unknown_step_s: float = 0.01  # one decode step, or the fixed part of a prefill
    unknown_prefill_s_per_token: float = 1e-5
    unknown_activation_s: float = 1.0

    @classmethod
    def nvidia_h100(cls) -> "DefaultCosts":
        """H100 SXM 80GB: 3.35 TB/s HBM3 peak, of which a device copy reaches ~3.0 TB/s
        (benchmarks/results/engine-nvidia-h100-*.json) and a good decode kernel ~2.5 TB/s;
        989 TFLOP/s dense BF16 peak, ~60% of it in large GEMMs; pinned host -> VMM device
        copies measured at ~53 GB/s (docs: DESIGN, PCIe 5 x16)."""
        return cls(memory_bytes_per_s=2.5e12, flops_per_s=600e12, h2d_bytes_per_s=50e9)

    def prefill_time(self, weight_bytes: int, num_tokens: int) -> float:
        if num_tokens <= 0:
            return 0.0
        params = weight_bytes / 2  # assume 16-bit weights
        return max(weight_bytes / self.memory_bytes_per_s,
                   2 * params * num_tokens / self.flops_per_s)

    def decode_step_time(self, weight_bytes: int, kv_bytes_per_token: int,
                         num_context_tokens: int) -> float:
        return (weight_bytes + kv_bytes_per_token * max(0, num_context_tokens)) \
            / self.memory_bytes_per_s

    def activation_time(self, weight_bytes: int) -> float:
        return weight_bytes / self.h2d_bytes_per_s


# ---- fitted curves -----------------------------------------------------------------------
@dataclass(frozen=True)
class _PrefillCurve:
    points: tuple[tuple[int, float], ...]  # sorted, distinct lengths, non-decreasing times

    @classmethod
    def of(cls, prefill) -> "_PrefillCurve":
        by_len: dict[int, list[float]] = {}
        for n, t in prefill:
            by_len.setdefault(n, []).append(t)
        points, running = [], 0.0
        for n in sorted(by_len):
            running = max(running, sum(by_len[n]) / len(by_len[n]))
            points.append((n, running))
        return cls(tuple(points))

    def __call__(self, num_tokens: float) -> float:
        if num_tokens <= 0:
            return 0.0
        pts = self.points
        n0, t0 = pts[0]
        if num_tokens <= n0:
            proportional = t0 * num_tokens / n0
            if len(pts) == 1:
                return proportional
            (n1, t1) = pts[1]
            line = t0 - (t1 - t0) / (n1 - n0) * (n0 - num_tokens)
            return max(line, proportional)
        for (na, ta), (nb, tb) in zip(pts, pts[1:]):
            if num_tokens <= nb:
                return ta + (tb - ta) * (num_tokens - na) / (nb - na)
        nk, tk = pts[-1]
        slope = tk / nk
        if len(pts) > 1:
            (nj, tj) = pts[-2]
            slope = max(slope, (tk - tj) / (nk - nj))
        return tk + slope * (num_tokens - nk)


@dataclass(frozen=True)
class _DecodeFit:
    """time = a + b * batch + c * total_context (a, b, c >= 0), never below `floor`."""

    a: float
    b: float
    c: float
    floor: float

    def __call__(self, batch_size: int, num_context_tokens: int) -> float:
        t = self.a + self.b * batch_size + self.c * max(0, num_context_tokens)
        return max(t, self.floor)


# Column subsets tried by the non-negative least squares, in order of preference on ties.
_SUBSETS = ((0, 1, 2), (0, 2), (0, 1), (1, 2), (2,), (1,), (0,))


def _fit_decode(decode, weight_bytes: int, kv_bytes_per_token: int,
                defaults: DefaultCosts) -> _DecodeFit:
    rows = [(1.0, float(b), float(b * c)) for b, c, _ in decode]
    times = [t for _, _, t in decode]
    floor = min(times)
    if len({r for r in rows}) == 1:
        # One distinct point: keep the default shape (weights + KV read), scaled through it.
        scale = times[0] / max(defaults.decode_step_time(weight_bytes, kv_bytes_per_token,
                                                         int(rows[0][2])), 1e-30)
        bw = defaults.memory_bytes_per_s
        return _DecodeFit(weight_bytes / bw * scale, 0.0, kv_bytes_per_token / bw * scale, floor)
    coef = _nnls3(rows, times)
    return _DecodeFit(coef[0], coef[1], coef[2], floor)


def _nnls3(rows: list[tuple[float, float, float]], times: list[float]) -> list[float]:
    """Non-negative least squares on relative error, exact for three unknowns: the optimum is
    the unconstrained solution on its support, so try every support and keep the best
    feasible one."""
    weights = [1.0 / max(t, 1e-12) for t in times]
    best, best_err = [0.0, 0.0, 0.0], math.inf
    for cols in _SUBSETS:
        sol = _weighted_lstsq([[r[j] for j in cols] for r in rows], times, weights)
        if sol is None or any(x < 0 for x in sol):
            continue
        coef = [0.0, 0.0, 0.0]
        for j, x in zip(cols, sol):
            coef[j] = x
        err = sum(((coef[0] * r[0] + coef[1] * r[1] + coef[2] * r[2] - t) * w) ** 2
                  for r, t, w in zip(rows, times, weights))
        if err < best_err * (1 - 1e-9) - 1e-18:
            best, best_err = coef, err
    return best


def _weighted_lstsq(x: list[list[float]], y: list[float], w: list[float]) -> list[float] | None:
    """Solve min sum (w_i (x_i . beta - y_i))^2 through the normal equations; None if the
    columns are (nearly) dependent. Columns are scaled to unit size first for conditioning."""
    k = len(x[0])
    scale = [max(abs(row[j]) for row in x) or 1.0 for j in range(k)]
    xs = [[row[j] / scale[j] * wi for j in range(k)] for row, wi in zip(x, w)]
    ys = [yi * wi for yi, wi in zip(y, w)]
    a = [[sum(r[i] * r[j] for r in xs) for j in range(k)] for i in range(k)]
    b = [sum(r[i] * yi for r, yi in zip(xs, ys)) for i in range(k)]
    sol = _solve(a, b)
    return None if sol is None else [s / scale[j] for j, s in enumerate(sol)]


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    n = len(b)
    m = [row[:] + [bi] for row, bi in zip(a, b)]
    norm = max(abs(v) for row in a for v in row) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) <= 1e-10 * norm:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [v - f * p for v, p in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


# ---- the cost model ----------------------------------------------------------------------
@dataclass
class _ModelCosts:
    profile: ModelProfile | None = None
    weight_bytes: int | None = None
    kv_bytes_per_token: int | None = None
    prefill: _PrefillCurve | None = None
    decode: _DecodeFit | None = None
    mixed: _DecodeFit | None = None  # what mixing adds beyond the larger part (see module doc)


class ProfileCostModel:
    """`prism.sched.view.CostModel` from measured profiles, else defaults (see module doc)."""

    def __init__(self, profiles: dict[str, ModelProfile] | None = None,
                 defaults: DefaultCosts = DefaultCosts()):
        self.defaults = defaults
        self._models: dict[str, _ModelCosts] = {}
        self._warned: set[str] = set()
        # (model, tokens) -> seconds: schedulers ask for the same prefills step after step
        self._prefill_memo: dict[tuple[str, int], float] = {}
        for model_id, profile in (profiles or {}).items():
            self.add(model_id, profile)

    # ---- registration --------------------------------------------------------------------
    def add(self, model_id: str, profile: ModelProfile) -> None:
        """Use `profile` for model_id (replacing any earlier one)."""
        costs = self._models.setdefault(model_id, _ModelCosts())
        self._prefill_memo.clear()
        costs.profile = profile
        costs.weight_bytes = profile.weight_bytes
        costs.kv_bytes_per_token = profile.kv_bytes_per_token
        costs.prefill = _PrefillCurve.of(profile.prefill) if profile.prefill else None
        costs.decode = (
            _fit_decode(profile.decode, profile.weight_bytes, profile.kv_bytes_per_token,
                        self.defaults) if profile.decode else None
        )
        costs.mixed = self._fit_mixed(model_id, profile.mixed) if profile.mixed else None

    def set_model_size(self, model_id: str, weight_bytes: int, kv_bytes_per_token: int) -> None:
        """Size of a model without a profile, so default costs scale with it. A profile's own
        sizes take precedence (they match its measurements)."""
        costs = self._models.setdefault(model_id, _ModelCosts())
        self._prefill_memo.clear()
        if costs.profile is None:
            costs.weight_bytes = int(weight_bytes)
            costs.kv_bytes_per_token = int(kv_bytes_per_token)

    def profile(self, model_id: str) -> ModelProfile | None:
        costs = self._models.get(model_id)
        return costs.profile if costs else None

    def _costs(self, model_id: str) -> _ModelCosts | None:
        costs = self._models.get(model_id)
        if costs is None or costs.weight_bytes is None:
            if model_id not in self._warned:
                self._warned.add(model_id)
                log.warning("no profile or size for model %r: using fixed default costs",
                            model_id)
            return None
        return costs

    # ---- CostModel -----------------------------------------------------------------------
    def prefill_time(self, model_id: str, num_tokens: int) -> float:
        if num_tokens <= 0:
            return 0.0
        t = self._prefill_memo.get((model_id, num_tokens))
        if t is None:
            t = self._prefill_memo[(model_id, num_tokens)] = self._prefill_time(model_id, num_tokens)
        return t

    def _prefill_time(self, model_id: str, num_tokens: int) -> float:
        costs = self._costs(model_id)
        if costs is None:
            d = self.defaults
            return d.unknown_step_s + d.unknown_prefill_s_per_token * num_tokens
        if costs.prefill is not None:
            return costs.prefill(num_tokens)
        return self.defaults.prefill_time(costs.weight_bytes, num_tokens)

    def decode_step_time(self, model_id: str, batch_size: int, num_context_tokens: int) -> float:
        """One decode step of `batch_size` sequences holding `num_context_tokens` tokens of
        context in total (summed over the batch)."""
        if batch_size <= 0:
            return 0.0
        costs = self._costs(model_id)
        if costs is None:
            return self.defaults.unknown_step_s
        if costs.decode is not None:
            return costs.decode(batch_size, num_context_tokens)
        return self.defaults.decode_step_time(costs.weight_bytes, costs.kv_bytes_per_token,
                                              num_context_tokens)

    def _fit_mixed(self, model_id: str, mixed) -> _DecodeFit:
        rows, extra = [], []
        for p, b, c, t in mixed:
            rows.append((1.0, float(b), float(b * c)))
            alone = max(self.prefill_time(model_id, p), self.decode_step_time(model_id, b, b * c))
            extra.append(max(t - alone, 1e-9))
        coef = _nnls3(rows, extra) if len(set(rows)) > 1 else [min(extra), 0.0, 0.0]
        return _DecodeFit(coef[0], coef[1], coef[2], 0.0)

    def mixed_step_time(self, model_id: str, num_decodes: int, num_context_tokens: int,
                        num_prefill_tokens: int) -> float | None:
        """A step with a prefill chunk beside decodes, from measured mixed steps; None
        without them (the caller picks its own rule)."""
        costs = self._models.get(model_id)
        if costs is None or costs.mixed is None:
            return None
        alone = max(self.prefill_time(model_id, num_prefill_tokens),
                    self.decode_step_time(model_id, num_decodes, num_context_tokens))
        return alone + costs.mixed(num_decodes, num_context_tokens)

    def activation_time(self, model_id: str) -> float:
        costs = self._costs(model_id)
        if costs is None:
            return self.defaults.unknown_activation_s
        h2d = (costs.profile.h2d_bytes_per_s if costs.profile else None) \
            or self.defaults.h2d_bytes_per_s
        return costs.weight_bytes / h2d


def step_seconds(cost: CostModel, model_id: str, num_decodes: int, num_context: int,
                 num_prefill: int) -> float:
    """The time of one step with these terms (StepPlan.cost_terms); see the module notes."""
    if num_prefill == 0:
        return cost.decode_step_time(model_id, num_decodes, num_context) if num_decodes else 0.0
    if num_decodes and hasattr(cost, "mixed_step_time"):
        measured = cost.mixed_step_time(model_id, num_decodes, num_context, num_prefill)
        if measured is not None:
            return measured
    t = cost.prefill_time(model_id, num_prefill + num_decodes)
    if num_decodes:
        t += max(0.0, cost.decode_step_time(model_id, num_decodes, num_context)
                 - cost.decode_step_time(model_id, num_decodes, 0))
    return t
