"""Batched token sampling: greedy, temperature, top-k, top-p, per-request seeds."""
from __future__ import annotations

import torch

from prism.types import SamplingParams


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator for a seeded request, on the device its logits live on (None: unseeded)."""
    if seed is None:
        return None
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Pick one token per row of logits [B, V]; returns int64 [B] on the logits' device."""
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError(f"got {batch} rows of logits, {len(params)} params, {len(generators)} generators")
    greedy_ids = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_ids
    dev = logits.device
    # Greedy rows get temperature 1 so the shared maths stays finite; their result is discarded.
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
    scaled = logits.float() / temps.unsqueeze(1)
    scaled = _filter_top_k_top_p(scaled, params)
    sampled = _draw(torch.softmax(scaled, dim=-1), generators)
    is_greedy = torch.tensor([p.greedy for p in params], device=dev)
    return torch.where(is_greedy, greedy_ids, sampled)


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
    drop = ranks >= torch.tensor(ks, device=dev).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    # Nucleus on what top-k left: drop a token when the mass before it already reaches top_p,
    # which keeps the smallest prefix with mass >= top_p and always the first token.
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    top_p = torch.tensor(ps, device=dev).unsqueeze(1)
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
