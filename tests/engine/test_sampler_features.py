"""Penalties, min_p, logit_bias and logprobs of the batched sampler, each checked against a
plain per-row reference on fresh random logits, alone and in mixed batches."""
import math

import pytest
import torch

from prism.engine.sampler import _apply_logit_bias, _apply_penalties, compute_logprobs, make_generator, sample
from prism.types import RequestError, SamplingParams

CPU = torch.device("cpu")
VOCAB = 97


def random_logits(batch: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def random_history(batch: int, seed: int, vocab: int = VOCAB) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        prompt = torch.randint(0, vocab, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        output = torch.randint(0, vocab, (int(torch.randint(0, 20, (1,), generator=g)),), generator=g).tolist()
        out.append((prompt, output))
    return out


# ---- references, one row at a time ---------------------------------------------------------
def reference_processed(row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """logit_bias, then repetition, frequency and presence penalties, token by token."""
    x = row.double().clone()
    for token, bias in (p.logit_bias or {}).items():
        x[token] += bias
    for token in set(prompt) | set(output):
        if p.repetition_penalty != 1.0:
            x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    for token in set(output):
        x[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return x


def reference_min_p_support(row: torch.Tensor, p: SamplingParams) -> set[int]:
    probs = torch.softmax(row.double() / p.temperature, -1)
    return {i for i in range(len(row)) if probs[i] >= p.min_p * probs.max()}


# ---- processing --------------------------------------------------------------------------
PENALTY_PARAMS = [
    SamplingParams(temperature=0.0, presence_penalty=1.5),
    SamplingParams(temperature=0.0, frequency_penalty=0.7),
    SamplingParams(temperature=0.0, repetition_penalty=1.8),
    SamplingParams(temperature=0.0, repetition_penalty=0.6, presence_penalty=-1.0, frequency_penalty=2.0),
    SamplingParams(temperature=0.0),  # no penalty beside the others: untouched
    SamplingParams(temperature=0.0, logit_bias={3: 5.0, 50: -100.0}),
]


def test_penalties_and_bias_match_the_reference():
    logits = random_logits(len(PENALTY_PARAMS), seed=1)
    history = random_history(len(PENALTY_PARAMS), seed=2)
    got = _apply_penalties(_apply_logit_bias(logits, PENALTY_PARAMS), PENALTY_PARAMS, history)
    for row, (p, (prompt, output)) in enumerate(zip(PENALTY_PARAMS, history)):
        want = reference_processed(logits[row], p, prompt, output)
        torch.testing.assert_close(got[row].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[4], logits[4])


def test_greedy_rows_pick_the_argmax_after_penalties_and_bias():
    logits = random_logits(len(PENALTY_PARAMS), seed=3)
    history = random_history(len(PENALTY_PARAMS), seed=4)
    before = logits.clone()
    out = sample(logits, PENALTY_PARAMS, [None] * len(PENALTY_PARAMS), history)
    assert torch.equal(logits, before)  # the raw logits stay as they were (logprobs read them)
    for row, (p, (prompt, output)) in enumerate(zip(PENALTY_PARAMS, history)):
        assert out[row].item() == reference_processed(logits[row], p, prompt, output).argmax().item()


def test_a_penalty_changes_what_greedy_picks():
    logits = torch.zeros(1, 10)
    logits[0, 4] = 1.0
    logits[0, 6] = 0.8
    history = [([1, 2], [4, 4])]
    plain = SamplingParams(temperature=0.0)
    assert sample(logits, [plain], [None], history).item() == 4
    for p in (SamplingParams(temperature=0.0, presence_penalty=0.5),
              SamplingParams(temperature=0.0, frequency_penalty=0.15),
              SamplingParams(temperature=0.0, repetition_penalty=1.5)):
        assert sample(logits, [p], [None], history).item() == 6


def test_repetition_penalty_covers_the_prompt_but_frequency_does_not():
    logits = torch.zeros(1, 10)
    logits[0, 2] = 1.0
    logits[0, 7] = 0.9
    history = [([2, 2, 2], [])]  # token 2 only in the prompt
    assert sample(logits, [SamplingParams(temperature=0.0, frequency_penalty=2.0)], [None], history).item() == 2
    assert sample(logits, [SamplingParams(temperature=0.0, repetition_penalty=1.2)], [None], history).item() == 7


def test_logit_bias_plus_100_makes_greedy_pick_it_and_minus_100_bans_it():
    logits = random_logits(4, seed=5)
    top = logits.argmax(-1)
    params = [SamplingParams(temperature=0.0, logit_bias={17: 100.0}),
              SamplingParams(temperature=0.0, logit_bias={int(top[1]): -100.0}),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, logit_bias={60: 100.0})]
    out = sample(logits, params, [None] * 4)
    assert out[0] == 17 and out[1] != top[1] and out[2] == top[2] and out[3] == 60


def test_sampled_rows_follow_the_processed_distribution():
    """Frequencies of a penalised, biased row at temperature 1 match the reference softmax."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.3,
                       logit_bias={5: 3.0})
    history = [([1, 3], [0, 0, 2])]
    n = 20000
    torch.manual_seed(0)
    out = sample(logits.expand(n, -1).contiguous(), [p] * n, [None] * n, history * n)
    freq = torch.bincount(out, minlength=6).double() / n
    want = torch.softmax(reference_processed(logits[0], p, *history[0]), -1)
    assert (freq - want).abs().max() < 0.02


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_keeps_exactly_the_reference_support(min_p):
    logits = random_logits(1, seed=6, vocab=40)
    p = SamplingParams(temperature=0.8, min_p=min_p)
    support = reference_min_p_support(logits[0], p)
    n = 4000
    torch.manual_seed(1)
    out = sample(logits.expand(n, -1).contiguous(), [p] * n, [None] * n)
    seen = set(out.tolist())
    assert seen <= support
    if min_p >= 0.3:  # a small support is fully visited in 4000 draws
        assert seen == support


def test_min_p_one_row_among_others():
    logits = random_logits(3, seed=7, vocab=40)
    params = [SamplingParams(temperature=1.0, min_p=0.5), SamplingParams(temperature=1.0), SamplingParams(temperature=0)]
    support = reference_min_p_support(logits[0], params[0])
    torch.manual_seed(2)
    draws = [sample(logits, params, [None] * 3) for _ in range(300)]
    assert {int(d[0]) for d in draws} <= support
    assert len({int(d[1]) for d in draws}) > len(support)  # the plain row is not cut
    assert {int(d[2]) for d in draws} == {int(logits[2].argmax())}


def test_seeded_rows_with_features_ignore_the_rest_of_the_batch():
    logits = random_logits(4, seed=8)
    history = random_history(4, seed=9)
    seeded = SamplingParams(temperature=1.0, seed=5, min_p=0.01, presence_penalty=1.0, logit_bias={1: 2.0})
    others = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0.0, repetition_penalty=1.3),
              SamplingParams(temperature=1.2, frequency_penalty=-1.0)]

    def draws(params, rows):
        gens = [make_generator(p.seed, CPU) for p in params]
        return [sample(logits[rows], params, gens, [history[r] for r in rows])[0].item() for _ in range(20)]

    alone = draws([seeded], [0])
    assert draws([seeded, *others], [0, 1, 2, 3]) == alone
    assert len(set(alone)) > 3


# ---- logprobs ----------------------------------------------------------------------------
def test_logprobs_are_the_raw_log_softmax_for_rows_that_ask():
    logits = random_logits(5, seed=10).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0, logprobs=5), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.5, logprobs=0, logit_bias={2: 50.0}),
              SamplingParams(temperature=1.0, logprobs=20, presence_penalty=2.0),
              SamplingParams(temperature=0.0, logprobs=1)]
    history = random_history(5, seed=11)
    tokens = sample(logits, params, [None] * 5, history)
    lps = compute_logprobs(logits, params, tokens).to_host(5)
    assert lps[1] is None
    for row, p in enumerate(params):
        if p.logprobs is None:
            continue
        # The reference: the log-softmax of the raw logits, whatever bias or penalty chose the token.
        ref = torch.log_softmax(logits[row].double(), -1)
        lp = lps[row]
        assert math.isclose(lp.logprob, ref[tokens[row]].item(), abs_tol=1e-4)
        assert len(lp.top) == p.logprobs
        # bfloat16 logits tie often: compare the values of the top list, not its ids.
        want = ref.sort(descending=True).values[: p.logprobs]
        values = [v for _, v in lp.top]
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), want, rtol=0, atol=1e-4)
        assert values == sorted(values, reverse=True)
        for t, v in lp.top:
            assert math.isclose(v, ref[t].item(), abs_tol=1e-4)
    # Greedy without bias: the chosen token is the first of the top list, same logprob.
    assert lps[0].top[0][0] == tokens[0].item() and lps[0].top[0][1] == lps[0].logprob
    assert lps[2].top == [] and tokens[2].item() == 2


def test_no_row_asks_no_logprobs():
    logits = random_logits(3, seed=12)
    assert compute_logprobs(logits, [SamplingParams()] * 3, logits.argmax(-1)) is None


# ---- validation --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"), ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"logit_bias": {5: 101.0}}, "logit_bias"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias"),
])
def test_bad_values_are_request_errors_naming_the_field(kwargs, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**kwargs)


def test_logit_bias_checked_against_the_vocabulary():
    p = SamplingParams(logit_bias={96: 1.0, 3: -2.0})
    p.check_vocabulary(97)
    with pytest.raises(RequestError, match="96"):
        p.check_vocabulary(96)
    assert SamplingParams(logit_bias={}).logit_bias is None


@pytest.mark.gpu
def test_cuda_features_match_cpu():
    dev = torch.device("cuda")
    logits = random_logits(len(PENALTY_PARAMS), seed=13)
    history = random_history(len(PENALTY_PARAMS), seed=14)
    params = [p if i % 2 else SamplingParams(**{**{f: getattr(p, f) for f in p.__struct_fields__}, "logprobs": 3})
              for i, p in enumerate(PENALTY_PARAMS)]
    cpu = sample(logits, params, [None] * len(params), history)
    gpu = sample(logits.to(dev), params, [None] * len(params), history)
    assert gpu.device.type == "cuda" and gpu.tolist() == cpu.tolist()
    lp_cpu = compute_logprobs(logits, params, cpu).to_host(len(params))
    lp_gpu = compute_logprobs(logits.to(dev), params, gpu).to_host(len(params))
    for a, b in zip(lp_cpu, lp_gpu):
        assert (a is None) == (b is None)
        if a is not None:
            assert math.isclose(a.logprob, b.logprob, abs_tol=1e-4) and [t for t, _ in a.top] == [t for t, _ in b.top]
