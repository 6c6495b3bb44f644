"""Measure one engine on its device: prefill time per prompt length, decode step time per
(batch size, context length). The result is a `ModelProfile` (prism.sched.cost), the input of
the cost model the schedulers plan with.

Steps are driven directly through the engine's block manager, model runner and scheduler
commit (as benchmarks/engine.py does), bypassing request bookkeeping. Each step is timed as
a serving engine pays for it (`timed_steps`): with overlap on CUDA, the larger of its GPU
time and its host time (batch building, launch); otherwise its wall time.
The engine must be idle; every block is freed afterwards and the engine's KV pages are
restored to exactly what it held before.
"""
from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from prism.engine.llm_engine import LLMEngine
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan
from prism.sched.cost import ModelProfile
from prism.types import SamplingParams

DEFAULT_PREFILL_LENGTHS = (32, 128, 512, 2048)
DEFAULT_BATCH_SIZES = (1, 4, 16, 64)
DEFAULT_CONTEXT_LENGTHS = (128, 1024)
QUICK_PREFILL_LENGTHS = (32, 512)
QUICK_BATCH_SIZES = (1, 8)
QUICK_CONTEXT_LENGTHS = (256,)
# (prefill tokens, decode batch, context per decoding sequence): one prompt chunk admitted
# beside a running batch, the step continuous batching makes whenever a request arrives.
DEFAULT_MIXED = ((128, 16, 1024), (512, 4, 1024), (512, 16, 1024), (512, 64, 1024), (2048, 16, 1024))
QUICK_MIXED = ((128, 8, 256),)

# The spin that holds the GPU while a timed step is built and queued: about 25 ms at the
# clocks of current data-center GPUs, longer than building any step takes (if it is not, the
# host time, which the result also covers, is the larger anyway).
_HOLD_CYCLES = 50_000_000

_PARAMS = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)


@dataclass
class _Session:
    """The sequences a profiling run created, so that all of them are freed in the end."""

    engine: LLMEngine
    seqs: list[Sequence] = field(default_factory=list)
    tokens: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def new_seq(self, num_tokens: int) -> Sequence:
        ids = torch.randint(0, self.engine.config.vocab_size, (num_tokens,),
                            generator=self.tokens).tolist()
        seq = Sequence(f"profile-{len(self.seqs)}", ids, _PARAMS)
        self.seqs.append(seq)
        return seq

    def free(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.engine.blocks.free(seq)
            self.engine.runner.forget(seq)


def profile_engine(
    engine: LLMEngine,
    prefill_lengths: Iterable[int] = DEFAULT_PREFILL_LENGTHS,
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    context_lengths: Iterable[int] = DEFAULT_CONTEXT_LENGTHS,
    repeats: int = 3,
    h2d_bytes_per_s: float | None = None,
    mixed_cases: Iterable[tuple[int, int, int]] = (),
) -> ModelProfile:
    """Profile `engine` (idle) on its device. Times are medians of `repeats` runs after one
    warm-up. Cases that do not fit the engine's free KV memory or max_model_len are skipped."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if engine.has_unfinished:
        raise RuntimeError(f"{engine.model_id} has requests in flight: profile an idle engine")
    session = _Session(engine)
    kv_pages_before = engine.blocks.num_mapped_pages
    try:
        prefill = [(n, t) for n in sorted(set(prefill_lengths))
                   if (t := _time_prefill(session, n, repeats)) is not None]
        decode = [(b, c, t) for b in sorted(set(batch_sizes)) for c in sorted(set(context_lengths))
                  if (t := _time_decode(session, b, c, repeats)) is not None]
        mixed = [(p, b, c, t) for p, b, c in sorted(set(mixed_cases))
                 if (t := _time_mixed(session, p, b, c, repeats)) is not None]
    finally:
        session.free(session.seqs)
        _restore_kv_pages(engine, kv_pages_before)
    return ModelProfile(
        model=engine.source.name,
        device=str(engine.device),
        card=device_name(engine.device),
        dtype=str(engine.dtype).removeprefix("torch."),
        date=datetime.date.today().isoformat(),
        weight_bytes=engine.weights.num_bytes,
        kv_bytes_per_token=engine.config.kv_bytes_per_token(engine.dtype.itemsize),
        prefill=prefill,
        decode=decode,
        mixed=mixed,
        h2d_bytes_per_s=h2d_bytes_per_s,
    )


def _fits(engine: LLMEngine, num_seqs: int, num_tokens: int) -> bool:
    """num_seqs sequences of num_tokens KV tokens each: within the context limit (positions
    0..num_tokens-1, plus the sampled token, as add_request demands) and the free KV memory."""
    if num_tokens < 1 or num_tokens >= engine.max_model_len:
        return False
    need = num_seqs * engine.blocks.num_blocks_for(num_tokens)
    return need <= engine.blocks.num_available_blocks()


def _time_prefill(session: _Session, num_tokens: int, repeats: int) -> float | None:
    """One sequence, the whole prompt in one chunk; the same KV slots are rewritten each run."""
    engine = session.engine
    if not _fits(engine, 1, num_tokens):
        return None
    seq = session.new_seq(num_tokens)
    try:
        if not engine.blocks.allocate(seq, num_tokens):
            return None
        plan = StepPlan((ScheduledChunk(seq, 0, num_tokens),))
        times = [_timed_execute(engine, plan)[0] for _ in range(1 + repeats)]
        return statistics.median(times[1:])
    finally:
        session.free([seq])


def _time_decode(session: _Session, batch: int, context: int, repeats: int) -> float | None:
    """`batch` sequences with `context` tokens in KV (prefilled for real), then one warm-up
    and `repeats` timed decode steps of the whole batch."""
    engine = session.engine
    num_steps = 1 + repeats
    if not _fits(engine, batch, context + num_steps):
        return None
    seqs = [session.new_seq(context) for _ in range(batch)]
    try:
        for seq in seqs:
            if not engine.blocks.allocate(seq, context + num_steps):
                return None
        prefill_all(engine, seqs, context)
        times = timed_decode_steps(engine, seqs, num_steps)
        return statistics.median(times[1:])
    finally:
        session.free(seqs)


def _time_mixed(session: _Session, prefill: int, batch: int, context: int, repeats: int) -> float | None:
    """`batch` sequences with `context` tokens in KV decode one token each while a new
    sequence prefills `prefill` tokens in the same step (its KV slots rewritten each run)."""
    engine = session.engine
    num_steps = 1 + repeats
    if not _fits(engine, batch + 1, max(context + num_steps, prefill)):
        return None
    seqs = [session.new_seq(context) for _ in range(batch)]
    new = session.new_seq(prefill)
    try:
        for seq in seqs:
            if not engine.blocks.allocate(seq, context + num_steps):
                return None
        if not engine.blocks.allocate(new, prefill):
            return None
        prefill_all(engine, seqs, context)
        times = []
        for _ in range(num_steps):
            chunks = decode_plan(seqs).chunks
            plan = StepPlan(chunks + (ScheduledChunk(new, 0, prefill),))
            seconds, sampled = _timed_execute(engine, plan)
            engine.scheduler.commit(StepPlan(chunks))
            for seq, token, _ in sampled:
                if seq is not new:
                    seq.output_token_ids.append(token)
            times.append(seconds)
        return statistics.median(times[1:])
    finally:
        session.free(seqs + [new])


def decode_plan(seqs: list[Sequence]) -> StepPlan:
    """One decode step of every sequence (each computes its next token)."""
    return StepPlan(tuple(ScheduledChunk(s, s.num_computed_tokens, 1) for s in seqs))


def timed_decode_steps(engine: LLMEngine, seqs: list[Sequence], num_steps: int) -> list[float]:
    """`num_steps` decode steps of all of `seqs` (their blocks already allocated), each timed
    around `runner.execute` with the device synchronized; sampled tokens are appended."""
    times = []
    for _ in range(num_steps):
        plan = decode_plan(seqs)
        seconds, sampled = _timed_execute(engine, plan)
        engine.scheduler.commit(plan)
        for seq, token, _ in sampled:
            seq.output_token_ids.append(token)
        times.append(seconds)
    return times


def prefill_all(engine: LLMEngine, seqs: list[Sequence], context: int) -> None:
    """Fill the sequences' KV, as many per step as the engine's token budget allows."""
    per_step = max(1, engine.scheduler.config.max_num_batched_tokens // context)
    for i in range(0, len(seqs), per_step):
        plan = StepPlan(tuple(ScheduledChunk(s, 0, context) for s in seqs[i : i + per_step]))
        for seq, token, _ in engine.runner.execute(plan):
            seq.output_token_ids.append(token)
        engine.scheduler.commit(plan)


def _timed_execute(engine: LLMEngine, plan: StepPlan) -> tuple[float, list]:
    seconds, (sampled,) = timed_steps([engine], [plan])
    return seconds, sampled


def timed_steps(engines: list[LLMEngine], plans: list[StepPlan]) -> tuple[float, list[list]]:
    """The time of one turn (each engine's plan launched, then all collected, as DeviceCore
    steps models beside each other) as a serving device sees it, and each engine's sampled
    tokens. Without overlap (or off CUDA) that is the wall time of building, launching and
    finishing the steps. With overlap the host builds the next turn while the GPU runs this
    one, so a turn costs the larger of its GPU time and its host time: the GPU time is taken
    with the device held busy (a spin kernel, which every engine's stream waits for) until
    the whole turn is queued, so no host work lands inside it; the host time is what building
    and queueing took."""
    device = engines[0].device
    synchronize(device)
    if device.type != "cuda" or not all(e.overlap for e in engines):
        start = time.perf_counter()
        launched = [e.runner.launch(p, None) for e, p in zip(engines, plans)]
        sampled = [e.runner.collect(step) for e, step in zip(engines, launched)]
        synchronize(device)
        return time.perf_counter() - start, sampled
    current = torch.cuda.current_stream(device)
    begin = torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(_HOLD_CYCLES)
    begin.record(current)
    start = time.perf_counter()
    launched = [e.runner.launch(p, None) for e, p in zip(engines, plans)]
    host_s = time.perf_counter() - start
    ends = [torch.cuda.Event(enable_timing=True) for _ in engines]
    for engine, end in zip(engines, ends):
        end.record(engine.runner.stream or current)
    sampled = [e.runner.collect(step) for e, step in zip(engines, launched)]
    synchronize(device)
    return max(max(begin.elapsed_time(end) for end in ends) / 1e3, host_s), sampled


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA): for timing host-side."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _restore_kv_pages(engine: LLMEngine, num_pages: int) -> None:
    """Leave the engine with exactly `num_pages` KV pages mapped, as before profiling (an idle
    engine's pages are all free spares, so unmap every free one, then map back that many)."""
    blocks = engine.blocks
    if blocks.num_mapped_pages == num_pages:
        return
    blocks.release_all_free_pages()
    if blocks.num_mapped_pages < num_pages:
        filler = Sequence("profile-restore", [0], _PARAMS)
        need = num_pages - blocks.num_mapped_pages
        blocks.allocate(filler, need * blocks.blocks_per_page * blocks.block_size)
        blocks.free(filler)  # keeps up to the block manager's number of spare pages mapped


def device_name(device: torch.device) -> str:
    """The card's name on CUDA; the CPU's model name otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def measure_h2d_bandwidth(device: torch.device | str, num_bytes: int = 256 << 20,
                          repeats: int = 5) -> float:
    """Pinned host -> device copy rate in bytes/s (median of `repeats` after one warm-up),
    timed with CUDA events: what activating a model's weights from host memory costs."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"host-to-device bandwidth needs a CUDA device, not {device}")
    src = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    with torch.cuda.device(device):
        for i in range(1 + repeats):
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            if i:
                times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return num_bytes / statistics.median(times)
