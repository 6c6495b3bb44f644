"""Batched token sampling on the logits' device, vectorised over the batch.

The order follows vLLM v1: logit_bias and penalties first (greedy rows get them too, before
the argmax), then temperature, min_p, top-k and top-p, and the draw. A feature no row of the
batch uses costs nothing (one look at the params on the host). Log-probabilities are of the
model's raw logits (vLLM v1's default), computed only for the rows that ask for them.
"""
from __future__ import annotations

import numpy as np
import torch

from prism.engine.transfer import device_tensor, to_host_async
from prism.types import SamplingParams, TokenLogprobs


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator for a seeded request, on the device its logits live on (None: unseeded)."""
    if seed is None:
        return None
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    history: list[tuple[list[int], list[int]]] | None = None,
) -> torch.Tensor:
    """Pick one token per row of logits [B, V]; returns int64 [B] on the logits' device.
    `history`: each row's (prompt token ids, output token ids so far), read only for rows
    with penalties (None: no row has any). `logits` is not modified."""
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError(f"got {batch} rows of logits, {len(params)} params, {len(generators)} generators")
    logits = _apply_logit_bias(logits, params)
    if any(p.uses_penalties for p in params):
        if history is None or len(history) != batch:
            raise ValueError("rows with penalties need their token history")
        logits = _apply_penalties(logits, params, history)
    greedy_ids = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_ids
    dev = logits.device
    # Greedy rows get temperature 1 so the shared maths stays finite; their result is discarded.
    temps = device_tensor([p.temperature if not p.greedy else 1.0 for p in params], torch.float32, dev)
    scaled = logits.float() / temps.unsqueeze(1)
    scaled = _filter_min_p(scaled, params)
    scaled = _filter_top_k_top_p(scaled, params)
    sampled = _draw(torch.softmax(scaled, dim=-1), generators)
    is_greedy = device_tensor([p.greedy for p in params], torch.bool, dev)
    return torch.where(is_greedy, greedy_ids, sampled)


def _apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Add each row's logit_bias (one scatter for the whole batch)."""
    rows, tokens, biases = [], [], []
    for row, p in enumerate(params):
        if p.logit_bias:
            rows += [row] * len(p.logit_bias)
            tokens += p.logit_bias.keys()
            biases += p.logit_bias.values()
    if not rows:
        return logits
    dev = logits.device
    index = (device_tensor(rows, torch.long, dev), device_tensor(list(tokens), torch.long, dev))
    return logits.float().index_put(index, device_tensor(list(biases), torch.float32, dev), accumulate=True)


def _apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                     history: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt and output tokens (a seen token's logit is
    divided by the penalty if positive, multiplied if not), then frequency (per occurrence)
    and presence (once) over the output tokens. Only the rows with a penalty are computed
    (their [rows, V] counts are the cost) and written back."""
    rows = [i for i, p in enumerate(params) if p.uses_penalties]
    dev, vocab = logits.device, logits.shape[1]
    chosen = [params[i] for i in rows]
    presence = device_tensor([p.presence_penalty for p in chosen], torch.float32, dev).unsqueeze(1)
    frequency = device_tensor([p.frequency_penalty for p in chosen], torch.float32, dev).unsqueeze(1)
    repetition = device_tensor([p.repetition_penalty for p in chosen], torch.float32, dev).unsqueeze(1)
    index = device_tensor(rows, torch.long, dev)
    sub = logits.index_select(0, index).float()
    output_counts = _token_counts([history[i][1] for i in rows], vocab, dev)
    if any(p.repetition_penalty != 1.0 for p in chosen):
        # Prompts of rows without a repetition penalty are left out: they would only cost the copy.
        prompts = [history[i][0] if params[i].repetition_penalty != 1.0 else [] for i in rows]
        seen = (output_counts > 0) | (_token_counts(prompts, vocab, dev) > 0)
        sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
    sub = sub - frequency * output_counts - presence * (output_counts > 0).float()
    return logits.float().index_copy(0, index, sub)


def _token_counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] float counts of each row's token ids: one padded host array, one copy, one
    scatter_add (the padding goes to an extra column that is dropped)."""
    width = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), max(width, 1)), vocab, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    ids_t = device_tensor(ids, torch.long, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    counts.scatter_add_(1, ids_t, torch.ones_like(ids_t, dtype=counts.dtype))
    return counts[:, :vocab]


def _filter_min_p(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p x the row's highest (after temperature)."""
    if all(p.min_p <= 0.0 or p.greedy for p in params):
        return scaled
    min_p = device_tensor([p.min_p for p in params], torch.float32, scaled.device).unsqueeze(1)
    probs = torch.softmax(scaled, dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    return scaled.masked_fill(drop, float("-inf"))


def _filter_top_k_top_p(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Set logits outside each row's top-k and nucleus to -inf (vectorised over rows)."""
    vocab = scaled.shape[1]
    # k <= 0 or k >= V means "off": keep the whole vocabulary.
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    ps = [p.top_p for p in params]
    if all(k == vocab for k in ks) and all(p >= 1.0 for p in ps):
        return scaled  # nothing to filter: skip the sort, the costly part
    dev = scaled.device
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=dev).unsqueeze(0)
    drop = ranks >= device_tensor(ks, torch.long, dev).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    # Nucleus on what top-k left: drop a token when the mass before it already reaches top_p,
    # which keeps the smallest prefix with mass >= top_p and always the first token.
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    top_p = device_tensor(ps, torch.float32, dev).unsqueeze(1)
    # top_p == 1 is "off": rounding in the cumsum must not drop the long tail.
    drop |= (mass_before >= top_p) & (top_p < 1.0)
    drop[:, 0] = False
    keep = torch.empty_like(drop).scatter_(1, order, ~drop)
    return scaled.masked_fill(~keep, float("-inf"))


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Sample each row by an exponential race: argmax(p / E), E ~ Exp(1), picks i with prob p_i.

    It needs one exponential_() per seeded row (drawn from that row's generator, so a seed
    gives the same tokens whatever else is in the batch) and one for all the other rows.
    """
    noise = torch.empty_like(probs).exponential_()
    for row, gen in enumerate(generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    # exponential_ can return exactly 0 on some backends; p / 0 would be inf (or nan for p = 0).
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return probs.div(noise).argmax(dim=-1)


# ---- log-probabilities ---------------------------------------------------------------------
class LogprobsOnDevice:
    """The log-probabilities a step's rows asked for, still on the device (read them with
    `to_host` once the step's tokens are read: one copy for the batch)."""

    def __init__(self, rows: list[int], num_top: list[int], chosen: torch.Tensor,
                 top_ids: torch.Tensor | None, top_logprobs: torch.Tensor | None):
        self.rows, self.num_top = rows, num_top
        self.chosen, self.top_ids, self.top_logprobs = chosen, top_ids, top_logprobs

    def start_host_copy(self) -> None:
        """Start copying to the host (read with `to_host` once the step's tokens are)."""
        self.chosen = to_host_async(self.chosen)
        if self.top_ids is not None:
            self.top_ids, self.top_logprobs = to_host_async(self.top_ids), to_host_async(self.top_logprobs)

    def to_host(self, batch: int) -> list[TokenLogprobs | None]:
        out: list[TokenLogprobs | None] = [None] * batch
        chosen = self.chosen.tolist()
        top_ids = self.top_ids.tolist() if self.top_ids is not None else None
        top_lps = self.top_logprobs.tolist() if self.top_logprobs is not None else None
        for i, (row, k) in enumerate(zip(self.rows, self.num_top)):
            top = list(zip(top_ids[i][:k], top_lps[i][:k])) if k else []
            out[row] = TokenLogprobs(chosen[i], top)
        return out


def compute_logprobs(logits: torch.Tensor, params: list[SamplingParams],
                     token_ids: torch.Tensor) -> LogprobsOnDevice | None:
    """The raw log-softmax of `logits` at each asking row's chosen token and its top-N
    (N = the row's `logprobs`); None when no row asks. The top-N of all asking rows are
    one topk of the batch's largest N, cut per row on the host."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    num_top = [params[i].logprobs for i in rows]
    dev = logits.device
    index = device_tensor(rows, torch.long, dev)
    raw = logits.index_select(0, index).float()
    logprobs = raw - raw.logsumexp(dim=-1, keepdim=True)
    chosen = logprobs.gather(1, token_ids.index_select(0, index).unsqueeze(1)).squeeze(1)
    top_ids = top_lps = None
    if max(num_top) > 0:
        top_lps, top_ids = logprobs.topk(min(max(num_top), logprobs.shape[1]), dim=-1)
    return LogprobsOnDevice(rows, num_top, chosen, top_ids, top_lps)
