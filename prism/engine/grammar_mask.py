"""Token bitmasks of grammar-constrained rows, applied to a batch's logits before sampling.

The masks are computed on the host by llguidance (all rows at once, in parallel threads, while
the device still runs the forward pass: nothing here waits for it), copied to the logits' device
and applied to the rows with a grammar only; other rows are untouched.

llguidance ships `llguidance.torch.apply_token_bitmask_inplace`, but it is a `torch.compile`d
function: its first call compiles for seconds (mid-serving) and needs a C compiler on CPU. The
same bit unpacking written with plain tensor ops (below) runs anywhere without a warm-up.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from prism.engine.transfer import device_tensor

if TYPE_CHECKING:
    from prism.engine.sequence import Sequence

BITS = 32


def grammar_rows(seqs: list[Sequence]) -> list[int]:
    return [i for i, s in enumerate(seqs) if s.grammar is not None]


def apply_grammar_masks(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Mask (in place) what each grammar row's matcher forbids; rows without one are unchanged.
    `seqs[i]` is the sequence of row i. Returns `logits`."""
    rows = grammar_rows(seqs)
    if not rows:
        return logits
    vocab = logits.shape[1]
    bitmask = host_bitmask([seqs[i] for i in rows], vocab)
    if logits.device.type == "cpu":
        # On the host numpy unpacks the bits (one thread, no pool to wake) and one in-place
        # fill applies the whole batch's mask.
        forbid = np.zeros(logits.shape, dtype=bool)
        forbid[rows] = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab] == 0
        return logits.masked_fill_(torch.from_numpy(forbid), float("-inf"))
    # On a GPU the packed words travel (32x smaller) and are unpacked there.
    allowed = unpack_bitmask(torch.from_numpy(bitmask).to(logits.device, non_blocking=True), vocab)
    index = device_tensor(rows, torch.long, logits.device)  # queued: torch.tensor(device=) would wait
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits


def host_bitmask(seqs: list[Sequence], vocab_size: int) -> np.ndarray:
    """int32 [len(seqs), ceil(V' / 32)]: bit t of row r set when token t may follow seq r. V' is
    the matchers' vocabulary, at least `vocab_size` (the logits'); bits past it stay unused."""
    import llguidance
    import llguidance.numpy as llnp

    width = max(vocab_size, *(s.grammar.vocab_size for s in seqs))
    bitmask = llnp.allocate_token_bitmask(len(seqs), width)
    for seq in seqs:  # a matcher must reflect exactly the sequence's outputs
        seq.grammar.sync(seq.output_token_ids)
    llnp.fill_next_token_bitmask_par(_executor(llguidance), [(s.grammar.matcher, i) for i, s in enumerate(seqs)], bitmask)
    for i, seq in enumerate(seqs):
        if seq.grammar.broken or not bitmask[i].any():  # never a row with nothing allowed: end it
            words = bitmask.view(np.uint32)
            words[i] = 0
            for eos in seq.grammar.eos_token_ids:
                words[i, eos // BITS] |= np.uint32(1 << (eos % BITS))
    return bitmask


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size] from int32 [rows, words] (bit t % 32 of word t // 32), as tensor
    ops on the words' device."""
    shifts = torch.arange(BITS, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: bit 31 still reads as 0 or 1
    return bits.flatten(1)[:, :vocab_size].bool()


_EXECUTOR = None


def _executor(llguidance):
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR
