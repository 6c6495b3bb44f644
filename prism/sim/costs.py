"""What a step takes on a simulated device: profiles as data, scaled where none was measured.

Every model on a simulated device gets a `ModelProfile` (the format `prism profile` writes),
and the device's step times come from a `ProfileCostModel` over those profiles, the same
fitting the schedulers plan with. Where each profile comes from, best first:

1. measured: a profile of the model's source in the profile folder (`prism profile` on the
   card; dropping new JSON files into the folder is all it takes to use them);
2. scaled: the measured profile of the nearest model by weight bytes, each point scaled to
   this model (see `scale_profile`): what the reference spent up to its roofline scales with
   bytes and FLOPs, what it spent beyond (kernel launches, Python) with the number of layers;
3. roofline: the card's nominal rates (`DefaultCosts`) sampled on a grid.

A device that stands for a tensor-parallel group of k GPUs divides each time by Amdahl's law
with the parallel fractions measured on Llama-2-70B at TP 2 and 4 on an H100 (Splitwise
profile; see benchmarks/results/sim-crosscheck-splitwise/), and copies weights k times as fast.

A step's time: `prism.sched.cost.step_seconds` (re-exported here), the rule the workers'
`CalibratedCost` predicts with too: a pure decode costs decode_step_time(batch, context); a
pure prefill prefill_time(tokens); a mixed step what the profile's measured mixed steps say
(ProfileCostModel.mixed_step_time), and for profiles without any, one forward pass over all
its tokens: prefill_time(prefill + decode tokens) plus the decodes' KV reads
(decode_step_time(batch, context) - decode_step_time(batch, 0)).

Steps of several models in one turn (concurrent_models > 1) are charged together by
`ConcurrentTurn` (prism.sched.concurrency), at the rates and under the contention rule (one
budget, or one per resource) that `prism profile --pair-with` measured (`concurrency.yaml` in
the profile folder), else at the card's nominal ones under one budget. Models stepping at their
own pace (pace "own") share the chip at the same rates and rule by `SharedChip`'s fluid rule.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prism.errors import UserError
from prism.sched.concurrency import ConcurrentTurn, ContentionRule, step_floor
from prism.sched.concurrency_profile import CONCURRENCY_FILE, ConcurrencyProfile
from prism.sched.cost import DefaultCosts, ModelProfile, ProfileCostModel, load_profiles, step_seconds
from prism.sched.global_view import TransferRates
from prism.sched.view import CostModel
from prism.sim.shapes import ModelShape

# Fitted on Splitwise's Llama-2-70B H100 profile, TP 2 -> 4 (medians over its cases; see
# benchmarks/sim_crosscheck.py and benchmarks/results/sim-crosscheck-splitwise/):
# the share of a step's time that divides among the GPUs of a tensor-parallel group.
TP_DECODE_PARALLEL_FRACTION = 0.60
TP_PREFILL_PARALLEL_FRACTION = 0.73

# Where the roofline is sampled (and scaled profiles are extended to).
GRID_PREFILL = (16, 64, 256, 1024, 4096, 16384)
GRID_BATCH = (1, 4, 16, 64, 256)
GRID_CONTEXT = (128, 1024, 4096)


def card_defaults(device: str) -> DefaultCosts:
    """The nominal rates the real worker assumes for a device kind (prism.worker)."""
    return DefaultCosts.nvidia_h100() if device.startswith("cuda") else DefaultCosts()


# ---- roofline ----------------------------------------------------------------------------------
def _roof_prefill(d: DefaultCosts, weight_bytes: int, n: int) -> float:
    return d.prefill_time(weight_bytes, n)


def _roof_decode(d: DefaultCosts, weight_bytes: int, kv: int, batch: int, context: int) -> float:
    return d.decode_step_time(weight_bytes, kv, batch * context)


def roofline_profile(shape: ModelShape, defaults: DefaultCosts, card: str, device: str) -> ModelProfile:
    """The card's nominal rates, sampled where a measured profile would be."""
    w, kv = shape.weight_bytes, shape.kv_bytes_per_token
    return ModelProfile(
        model=shape.source, device=device, card=f"{card} (roofline)", dtype=f"{8 * shape.itemsize}-bit",
        date="-", weight_bytes=w, kv_bytes_per_token=kv,
        prefill=[(n, _roof_prefill(defaults, w, n)) for n in GRID_PREFILL],
        decode=[(b, c, _roof_decode(defaults, w, kv, b, c)) for b in GRID_BATCH for c in GRID_CONTEXT],
        h2d_bytes_per_s=defaults.h2d_bytes_per_s,
    )


# ---- scaling a measured profile to another model ------------------------------------------------
def _scaled(t_ref: float, roof_ref: float, roof_new: float, layer_ratio: float) -> float:
    # Up to its roofline the reference's time is work that scales with bytes and FLOPs; what it
    # spent beyond is per-layer overhead (launches, host work) that scales with depth.
    if t_ref <= roof_ref:
        return t_ref * roof_new / roof_ref
    return roof_new + (t_ref - roof_ref) * layer_ratio


def scale_profile(ref: ModelProfile, ref_shape: ModelShape, shape: ModelShape,
                  defaults: DefaultCosts) -> ModelProfile:
    """`ref` (measured on another model) scaled point by point to `shape`."""
    d, layers = defaults, shape.num_layers / ref_shape.num_layers
    w0, w1 = ref.weight_bytes, shape.weight_bytes
    kv0, kv1 = ref.kv_bytes_per_token, shape.kv_bytes_per_token
    prefill = [(n, _scaled(t, _roof_prefill(d, w0, n), _roof_prefill(d, w1, n), layers))
               for n, t in ref.prefill]
    decode = [(b, c, _scaled(t, _roof_decode(d, w0, kv0, b, c), _roof_decode(d, w1, kv1, b, c), layers))
              for b, c, t in ref.decode]

    def roof_mixed(w, kv, p, b, c):
        return _roof_prefill(d, w, p + b) + _roof_decode(d, 0, kv, b, c)

    mixed = [(p, b, c, _scaled(t, roof_mixed(w0, kv0, p, b, c), roof_mixed(w1, kv1, p, b, c), layers))
             for p, b, c, t in ref.mixed]
    return dataclasses.replace(
        ref, model=shape.source, card=f"{ref.card} (scaled from {ref.model})",
        weight_bytes=w1, kv_bytes_per_token=kv1, prefill=prefill, decode=decode, mixed=mixed,
    )


def tp_profile(profile: ModelProfile, num_gpus: int) -> ModelProfile:
    """`profile` of one GPU as run by a tensor-parallel group of `num_gpus` (Amdahl's law)."""
    if num_gpus == 1:
        return profile

    def amdahl(fraction: float) -> float:
        return fraction / num_gpus + (1 - fraction)

    pre, dec = amdahl(TP_PREFILL_PARALLEL_FRACTION), amdahl(TP_DECODE_PARALLEL_FRACTION)
    h2d = profile.h2d_bytes_per_s
    return dataclasses.replace(
        profile, card=f"{profile.card} x{num_gpus} (TP)",
        prefill=[(n, t * pre) for n, t in profile.prefill],
        decode=[(b, c, t * dec) for b, c, t in profile.decode],
        mixed=[(p, b, c, t * pre) for p, b, c, t in profile.mixed],
        h2d_bytes_per_s=None if h2d is None else h2d * num_gpus,  # each GPU copies its shard
    )


# ---- the serving stack around the forward pass --------------------------------------------------
HOST_FILE = "host.yaml"
STORAGE_BYTES_PER_S = TransferRates().storage_bytes_per_s


@dataclass(frozen=True)
class HostOverheads:
    """Time the server spends outside forward passes, which a profile does not measure:
    `step_s` per device step plus `seq_s` per sequence in the step (the worker's scheduling,
    batch building, output handling and messages, which grow with the batch) and `request_s`
    per request (HTTP, routing and IPC between the client and the worker). Measured from a
    solo run (`from_solo`: step_s and request_s) or fitted to a real run's step log
    (benchmarks/step_log.py: step_s and seq_s), kept as `host.yaml` beside the profiles.

    `scheduling_scale` > 0 also charges each step the wall time this process spends in the
    step's own scheduling code (snapshot, local scheduler, batch scheduler, outputs: the very
    Python a real worker runs between forward passes), times the scale (the real host's CPU
    relative to this one). What grows with the queue is then charged as it grows, at the price
    of determinism: runs with it on differ in their last digits."""

    step_s: float = 0.0
    request_s: float = 0.0
    scheduling_scale: float = 0.0
    seq_s: float = 0.0
    # Whether the servers had these profiles installed ($PRISM_PROFILE_DIR) to plan with; a
    # server without them plans from the card's nominal rates (and calibrates).
    server_has_profiles: bool = True
    # What a fresh server's first eager step of a shape class costs beyond later ones (ColdShapes).
    cold_shape_s: float = 0.0
    # Reading a checkpoint from storage into host memory, when a node holds no host copy of a
    # model it activates (host_copies.py). Not measured yet: the default is a local NVMe SSD's
    # sustained read (a few GB/s), less what deserializing costs.
    storage_bytes_per_s: float = STORAGE_BYTES_PER_S
    # The worker is one process (prism's own worker running every model of the device): at
    # their own pace its models' launches take turns on its one host thread, each holding it for
    # its launch time (`launch_time`), and a step cannot end before its last kernel is launched.
    # Off: each model's host time on a timeline of its own, as separate engine processes.
    one_host_thread: bool = False
    # A launch's host time (a step call's wall time at its own pace), fitted to step logs
    # (benchmarks/step_log.py fit_launch): per step and per sequence in it, and per model layer
    # for steps that carry prefill tokens (attention launched eagerly between graph pieces) and
    # on top for those beyond the piecewise graphs' token cap (every kernel launched eagerly).
    launch_s: float = 0.0
    launch_seq_s: float = 0.0
    launch_prefill_layer_s: float = 0.0
    launch_eager_layer_s: float = 0.0

    @classmethod
    def load(cls, path: Path) -> "HostOverheads":
        import yaml

        raw = yaml.safe_load(path.read_text()) or {}
        try:
            return cls(float(raw.get("step_overhead_ms", 0)) / 1e3, float(raw.get("request_latency_ms", 0)) / 1e3,
                       float(raw.get("scheduling_scale", 0)), float(raw.get("seq_overhead_us", 0)) / 1e6,
                       bool(raw.get("server_has_profiles", True)), float(raw.get("cold_shape_ms", 0)) / 1e3,
                       float(raw.get("storage_gb_per_s", STORAGE_BYTES_PER_S / 1e9)) * 1e9,
                       bool(raw.get("one_host_thread", False)), float(raw.get("launch_ms", 0)) / 1e3,
                       float(raw.get("launch_seq_us", 0)) / 1e6, float(raw.get("launch_prefill_layer_us", 0)) / 1e6,
                       float(raw.get("launch_eager_layer_us", 0)) / 1e6)
        except (TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path}: not host overheads ({e})") from None

    def save(self, path: Path, note: str = "") -> None:
        path.write_text((f"# {note}\n" if note else "") + f"step_overhead_ms: {1e3 * self.step_s:.3f}\n"
                        f"request_latency_ms: {1e3 * self.request_s:.3f}\n"
                        f"seq_overhead_us: {1e6 * self.seq_s:.2f}\n"
                        f"scheduling_scale: {self.scheduling_scale:g}\n"
                        f"server_has_profiles: {str(self.server_has_profiles).lower()}\n"
                        f"cold_shape_ms: {1e3 * self.cold_shape_s:.3f}\n"
                        f"storage_gb_per_s: {self.storage_bytes_per_s / 1e9:g}\n" + self._launch_yaml())

    def _launch_yaml(self) -> str:
        """The launch model's lines, only where one is set (files without it stay as they were)."""
        if not (self.one_host_thread or self.launch_s or self.launch_seq_s or self.launch_prefill_layer_s
                or self.launch_eager_layer_s):
            return ""
        return (f"one_host_thread: {str(self.one_host_thread).lower()}\n"
                f"launch_ms: {1e3 * self.launch_s:.4f}\n"
                f"launch_seq_us: {1e6 * self.launch_seq_s:.3f}\n"
                f"launch_prefill_layer_us: {1e6 * self.launch_prefill_layer_s:.3f}\n"
                f"launch_eager_layer_us: {1e6 * self.launch_eager_layer_s:.3f}\n")

    def step_time(self, num_seqs: int) -> float:
        """Host time of one step of `num_seqs` sequences, beyond its forward pass."""
        return self.step_s + self.seq_s * num_seqs

    def launch_time(self, num_seqs: int, num_tokens: int, num_prefill: int, num_layers: int,
                    graph_max_tokens: int) -> float:
        """A step's launch time on the worker's host thread (the launch model's fields): a step
        of `num_tokens` with `num_prefill` prefill tokens runs as piecewise graphs up to
        `graph_max_tokens` (EngineConfig.mixed_graph_max_tokens), eagerly beyond."""
        per_layer = 0.0
        if num_prefill:
            per_layer = self.launch_prefill_layer_s + (self.launch_eager_layer_s if num_tokens > graph_max_tokens else 0.0)
        return self.launch_s + self.launch_seq_s * num_seqs + per_layer * num_layers

    @classmethod
    def from_solo(cls, records, cost: CostModel, cold_shape_s: float = 0.0,
                  shape_key: Callable[[str], object] = lambda model: model) -> "HostOverheads":
        """From requests served alone (in a solo run, all of them; in any other run, those
        whose lifetime overlapped no other request's): the median of what each decode step
        took beyond the profile, and of what the first token took beyond the prefill and that
        step overhead. `cost` is keyed by the records' model names. With `cold_shape_s`, a
        request whose prompt was the first of its shape class (`shape_key` of its model, and
        its prompt's token-count class) since the run began is taken to have paid it, so the
        request latency left is what a warm server adds."""
        import statistics

        done = sorted((r for r in records if r.ok and r.tpot is not None and r.ttft is not None),
                      key=lambda r: r.send_s)
        alone = served_alone(done)
        cold = ColdShapes(cold_shape_s)
        paid = {id(r): cold.charge(shape_key(r.model), (0, 0, r.input_len)) for r in done}
        steps = [r.tpot - cost.decode_step_time(r.model, 1, r.input_len + r.output_len // 2) for r in alone]
        firsts = [r.ttft - cost.prefill_time(r.model, r.input_len) - paid[id(r)] for r in alone]
        if not steps:
            raise UserError("no finished request served alone to calibrate from")
        step = max(0.0, statistics.median(steps))
        # seq_s stays 0: one sequence per step here
        return cls(step, max(0.0, statistics.median(firsts) - step), cold_shape_s=cold_shape_s)


def served_alone(records) -> list:
    """The records whose lifetime (send to finish) overlapped no other record's."""
    return [r for r in records
            if not any(o is not r and o.send_s < r.finish_s and o.finish_s > r.send_s for o in records)]


def token_class(num_tokens: int) -> int:
    """A step's token count in powers of two: 1, 2, 3-4, 5-8, 9-16, ... -> 0, 1, 2, 3, 4, ..."""
    return max(0, num_tokens - 1).bit_length()


class ColdShapes:
    """The first eager step (a prefill, or a prefill beside decodes) of each model shape in
    each token-count class (`token_class`) costs a fresh server `cost_s` more than later ones:
    CUDA loads kernels on first use and cuBLAS picks its kernels by problem size. Decode steps
    replay CUDA graphs captured at start and pay nothing. One per device (kernels are loaded
    per process), shared by its engines; models of one shape share their kernels. On the
    H200, 2026-12-01, about 10 ms (benchmarks/step_log.py fits it to a step log)."""

    def __init__(self, cost_s: float = 0.0):
        self.cost_s = cost_s
        self._seen: set = set()

    def charge(self, shape_key, terms: tuple[int, int, int]) -> float:
        """The extra time of a step with these cost terms (decodes, context, prefill tokens)."""
        num_decodes, _, num_prefill = terms
        if not num_prefill:
            return 0.0
        key = (shape_key, token_class(num_decodes + num_prefill))
        if key in self._seen:
            return 0.0
        self._seen.add(key)
        return self.cost_s


# ---- the profiles of a cluster ------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileSet:
    """Measured profiles by model source, the shapes of the measured models (to scale from),
    and the host overheads and the rates of steps side by side measured beside them."""

    measured: dict[str, ModelProfile]
    ref_shapes: dict[str, ModelShape]
    host: HostOverheads = HostOverheads()
    concurrency: ConcurrencyProfile | None = None
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(cls, folder: str | Path | None) -> "ProfileSet":
        """Every profile in `folder` (none: roofline only). Models are resolved through the
        catalog by their profile's name, so references must be catalog names or paths."""
        from prism.config import ModelSpec
        from prism.sim.shapes import model_shape

        if folder is None:
            return cls({}, {})
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise UserError(f"profile folder not found: {folder}")
        measured = load_profiles(folder)
        shapes = {}
        for source, p in measured.items():
            shape = model_shape(ModelSpec(source, source, dtype=_spec_dtype(p)), p.device)
            shapes[source] = dataclasses.replace(shape, weight_bytes=p.weight_bytes)
        host, concurrency = folder / HOST_FILE, folder / CONCURRENCY_FILE
        return cls(measured, shapes, HostOverheads.load(host) if host.is_file() else HostOverheads(),
                   ConcurrencyProfile.load(concurrency) if concurrency.is_file() else None)

    def concurrent_rates(self, device: str) -> DefaultCosts:
        """The rates a turn of steps side by side is charged at on `device` (ConcurrentTurn):
        those measured on its kind of device (concurrency.yaml), else the card's nominal ones."""
        nominal = card_defaults(device)
        c = self._concurrency_on(device)
        return nominal if c is None else c.rates(nominal)

    def contention_rule(self, device: str) -> ContentionRule:
        """How steps side by side contend on `device` (ConcurrentTurn, SharedChip): the rule
        the turns measured on its kind of device picked (concurrency.yaml), else one budget."""
        c = self._concurrency_on(device)
        return ContentionRule.ONE_BUDGET if c is None else c.rule

    def interleave(self, device: str) -> float | None:
        """How models at their own pace share `device` (SharedChip): their steps' layers take
        turns with this wait, where steps relaunched side by side were measured on its kind of
        device and picked it (concurrency.yaml's own_pace); None: the contention rule's fluid
        sharing."""
        c = self._concurrency_on(device)
        return None if c is None else c.interleave

    def _concurrency_on(self, device: str) -> ConcurrencyProfile | None:
        c = self.concurrency
        return c if c is not None and c.device.split(":")[0] == device.split(":")[0] else None

    def nearest(self, shape: ModelShape) -> str | None:
        """The measured source closest to `shape` in weight bytes (log scale)."""
        if not self.measured:
            return None
        return min(self.measured, key=lambda s: (abs(math.log(max(1, self.measured[s].weight_bytes))
                                                     - math.log(max(1, shape.weight_bytes))), s))

    def profile_for(self, shape: ModelShape, device: str, num_gpus: int = 1) -> tuple[ModelProfile, str]:
        """(profile, how it was obtained: measured | scaled | roofline) for one GPU group."""
        defaults = card_defaults(device)
        if shape.source in self.measured:
            profile, how = self.measured[shape.source], "measured"
        elif (ref := self.nearest(shape)) is not None:
            profile = scale_profile(self.measured[ref], self.ref_shapes[ref], shape, defaults)
            how = f"scaled from {ref}"
        else:
            profile, how = roofline_profile(shape, defaults, device, device), "roofline"
        return tp_profile(profile, num_gpus), how


    def cost_model(self, shapes: dict[str, ModelShape], device: str, num_gpus: int = 1
                   ) -> tuple[ProfileCostModel, dict[str, str]]:
        """The step-time model of a device holding `shapes` (by model name), and how each
        model's profile was obtained. Devices of one kind share one (it keeps no state)."""
        key = (device.split(":")[0], num_gpus,
               tuple(sorted((name, s.source, s.itemsize) for name, s in shapes.items())))
        if key not in self._memo:
            per_model, how = {}, {}
            for name, shape in shapes.items():
                per_model[name], how[name] = self.profile_for(shape, device, num_gpus)
            self._memo[key] = (device_cost_model(per_model, device), how)
        return self._memo[key]


def _spec_dtype(profile: ModelProfile) -> str:
    return profile.dtype if profile.dtype in ("float32", "bfloat16", "float16") else "auto"


def device_cost_model(profiles: dict[str, ModelProfile], device: str) -> ProfileCostModel:
    """A cost model over per-model profiles (keyed by model name)."""
    return ProfileCostModel(profiles, defaults=card_defaults(device))


__all__ = [
    "CONCURRENCY_FILE", "ConcurrencyProfile", "ConcurrentTurn", "ContentionRule",
    "GRID_BATCH", "GRID_CONTEXT", "GRID_PREFILL",
    "HOST_FILE", "HostOverheads", "ProfileSet", "TP_DECODE_PARALLEL_FRACTION", "TP_PREFILL_PARALLEL_FRACTION",
    "card_defaults", "device_cost_model", "roofline_profile", "scale_profile", "step_floor", "step_seconds",
    "tp_profile",
]
