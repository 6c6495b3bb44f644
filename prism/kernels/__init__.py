"""Triton kernels for the GPU engine path (each module imports triton; import them lazily)."""

import torch

_ANCHORS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def cache_pointer(cache: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(anchor, offset): pass these instead of a KV cache view; the kernel addresses the cache
    as `anchor_ptr + offset`.

    Triton checks, at every launch, that a tensor argument's first byte is mapped device
    memory. A KV cache lives in an elastic arena whose pages come and go, so its first page may
    well be unmapped (no sequence uses it) while the kernel only touches mapped ones. A small
    always-allocated tensor of the same dtype passes the check; the distance to the cache, in
    elements, travels as an integer (arena bases are page-aligned, so it divides evenly)."""
    key = (cache.device, cache.dtype)
    if key not in _ANCHORS:
        _ANCHORS[key] = torch.zeros(16, dtype=cache.dtype, device=cache.device)
    anchor = _ANCHORS[key]
    distance = cache.data_ptr() - anchor.data_ptr()
    if distance % cache.element_size():
        raise ValueError("KV cache and anchor are not aligned to the element size")
    return anchor, distance // cache.element_size()


def fix_interpreter_scalars() -> None:
    """Triton 3.6's interpreter holds a scalar as a 1-element array and turns it into a loop
    bound with int(array), which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be
    converted", triton-lang/triton#9171): any `range(lo, hi)` over loaded bounds fails.
    Patch that one conversion (idempotent; the interpreter only, never the compiled path;
    a Triton without that hook is left alone)."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_scalar_index_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._scalar_index_fixed = True
    interpreter._patch_lang_tensor = patched
