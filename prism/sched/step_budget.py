"""How many tokens the running model's next step may batch under prism: the prefill chunk
beside its running decodes, limited only where a decode would otherwise miss its TPOT.

TPOT is judged over a whole request, (finish - first token) / (output tokens - 1), so a long
step beside a decode is a miss only if the decode cannot make up for it: what its remaining
tokens leave of its time, at the decode batch's pace, is its spare, shared among the steps that
may still carry prefill chunks (`tpot_room`). A long-output request ahead of its pace absorbs a
long prefill step; a short one just after its first token cannot.

Each prefill chunk costs a pass over the weights, so small chunks multiply passes and slow
every prefill (and every model waiting behind them). The chunk is therefore never cut below
the size at which a step stops being dominated by its fixed part (`weight_bound_chunk`), and
not at all when even that size would not save the endangered decodes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from prism.sched.view import RequestView


def weight_bound_chunk(prefill_time: Callable[[int], float], max_tokens: int) -> int:
    """The prefill chunk at which a step's token-proportional cost equals its fixed cost:
    `max_tokens` x t(1) / t(max_tokens), t being the model's prefill time. On a roofline
    (time = max(weights / bandwidth, FLOPs / rate)) it is the ridge point; below it a smaller
    chunk saves little time per step and adds steps."""
    full, one = prefill_time(max_tokens), prefill_time(1)
    if full <= 0:
        return max_tokens
    return max(1, min(max_tokens, round(max_tokens * one / full)))


def tpot_room(r: RequestView, now: float, decode_step_s: float, prefill_steps: int) -> float:
    """How long the next step may take with `r` (decoding) still meeting its TPOT as judged.

    Its remaining tokens at `decode_step_s` each would leave it some spare time before
    first + (output tokens - 1) x TPOT (its max_tokens stands for its length: a request that
    stops early is judged over fewer gaps). Prefill chunks may land on each of its next
    `prefill_steps` steps (the pending prefill, cut in chunks no smaller than the floor), so
    this step gets its share of the spare, not all of it: taking all would leave the next
    chunk nothing."""
    first = r.first_token_time if r.first_token_time is not None else now
    remaining = max(1, r.max_tokens - r.num_output_tokens)
    due = first + (r.max_tokens - 1) * r.slo.tpot_s
    spare = due - now - remaining * decode_step_s
    return decode_step_s + spare / max(1, min(remaining, prefill_steps))


def step_token_budget(decodes: Sequence[RequestView], pending_prefill: int, now: float,
                      decode_step_s: float, step_s: Callable[[int], float], floor: int,
                      max_tokens: int) -> int | None:
    """The step's token budget (decodes + prefill chunk), or None for the full one.

    `step_s(p)`: the estimated time of the step with `p` prefill tokens beside the decodes;
    `pending_prefill`: the model's prefill tokens waiting to be computed; `floor`: the least
    chunk (`weight_bound_chunk`); `max_tokens`: the engine's budget per step.
    The chunk is the largest that keeps every decode that the floor chunk can keep within its
    TPOT; no limit when no decode is endangered by the full chunk or none can be saved."""
    num_decodes = len(decodes)
    full_chunk = min(pending_prefill, max_tokens - num_decodes)
    if full_chunk <= floor:
        return None
    full = step_s(full_chunk)
    at_floor = step_s(floor)
    prefill_steps = -(-pending_prefill // floor)
    rooms = [tpot_room(r, now, decode_step_s, prefill_steps) for r in decodes if r.max_tokens > 1]
    saveable = [room for room in rooms if at_floor <= room < full]
    if not saveable:
        return None
    target = min(saveable)
    lo, hi = floor, full_chunk  # step_s(lo) <= target < step_s(hi): the largest chunk that fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if step_s(mid) <= target else (lo, mid)
    return num_decodes + lo


__all__ = ["step_token_budget", "tpot_room", "weight_bound_chunk"]
