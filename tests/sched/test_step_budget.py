"""prism's step size (prism/sched/step_budget.py): a prefill chunk is cut only where a decode
would miss its TPOT as judged over the request, and never below the weight-bound chunk."""
from prism.sched.cost import DefaultCosts
from prism.sched.step_budget import step_token_budget, tpot_room, weight_bound_chunk
from prism.sched.view import SLO, RequestView

H100 = DefaultCosts.nvidia_h100()
W = 16 << 30  # an 8B model's 16-bit weights


def decoding(req_id: str, first: float, out: int, max_tokens: int, tpot: float) -> RequestView:
    return RequestView(req_id, "m", 0.0, SLO(1.0, tpot), 128, 128, out, max_tokens,
                       first_token_time=first, last_token_time=first, running=True)


def step_s(p: int) -> float:
    """One millisecond of fixed cost per step plus 0.1 ms per prefill token."""
    return 0.001 + 0.0001 * p


def test_the_weight_bound_chunk_is_the_rooflines_ridge_point():
    chunk = weight_bound_chunk(lambda n: H100.prefill_time(W, n), 2048)
    assert abs(chunk - H100.flops_per_s / H100.memory_bytes_per_s) <= 1  # 240 tokens
    # A step that never stops being fixed-cost bound within the budget is never cut.
    assert weight_bound_chunk(lambda n: 0.01, 2048) == 2048


def test_a_long_output_ahead_of_its_pace_keeps_the_full_chunk():
    # 300 tokens still to come at 1 ms each, 20 ms TPOT: 7.6 s of spare, shared by the 10
    # chunk steps a 4,000-token prompt takes at the floor of 400: a full step (205 ms) fits.
    d = decoding("d", first=0.0, out=100, max_tokens=400, tpot=0.02)
    assert step_token_budget([d], 4000, 0.1, 0.001, step_s, 400, 2048) is None


def test_a_short_output_just_after_its_first_token_gets_a_cut_chunk():
    # 4 tokens to come under an 8 ms TPOT at a 1 ms decode pace: 28 ms of spare, shared by its
    # 4 steps (a 4,000-token prompt needs more chunk steps than that): 8 ms for this step.
    d = decoding("d", first=0.0, out=1, max_tokens=5, tpot=0.008)
    assert abs(tpot_room(d, 0.0, 0.001, prefill_steps=200) - 0.008) < 1e-12
    budget = step_token_budget([d], 4000, 0.0, 0.001, step_s, 20, 2048)
    assert budget == 1 + 70  # 1 ms + 70 x 0.1 ms = 8 ms
    # A 50-token prefill is at most 3 chunk steps: a share of 10 ms, and its whole step (6 ms) fits.
    assert step_token_budget([d], 50, 0.0, 0.001, step_s, 20, 2048) is None


def test_never_below_the_floor_and_not_at_all_when_the_floor_cannot_save_it():
    d = decoding("d", first=0.0, out=1, max_tokens=5, tpot=0.008)
    assert step_token_budget([d], 4000, 0.0, 0.001, step_s, 60, 2048) == 1 + 70
    # The floor step (1 + 8 ms) already misses its share: cutting would only cost passes.
    assert step_token_budget([d], 4000, 0.0, 0.001, step_s, 80, 2048) is None
    # Nothing to cut: the pending prefill is no larger than the floor.
    assert step_token_budget([d], 20, 0.0, 0.001, step_s, 20, 2048) is None
