"""Small fused kernels for the layer body: each replaces several PyTorch launches with one.

At batch 1 a decode step is a few hundred kernels, each moving a few KiB: their launch count,
not their bytes, sets the time. These keep the reference's numerics (transformers' order:
normalize in float32, cast to the model dtype, then scale by the weight).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from prism.kernels import cache_pointer


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_res, stride_out, n_cols, eps,
    ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if ADD_RESIDUAL:
        # residual <- residual + x, in the model dtype as the reference adds them
        x = (tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0) + x).to(x_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_res + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    y = w * (xf * inv).to(x_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of a 2-D tensor."""
    return _launch_rms_norm(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place); returns RMSNorm(residual). One pass instead of two."""
    return _launch_rms_norm(x, residual, weight, eps)


def _launch_rms_norm(x, residual, weight, eps) -> torch.Tensor:
    x = _rows(x)
    out = torch.empty_like(x)
    res = x if residual is None else residual  # unused without ADD_RESIDUAL
    n = x.shape[-1]
    _rms_norm_kernel[(x.shape[0],)](
        x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), n, eps,
        ADD_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=_warps(n),
    )
    return out


def _warps(n: int) -> int:
    return 8 if n >= 4096 else 4 if n >= 1024 else 1


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=ok, other=0.0)
    # F.silu on a bf16 tensor computes in float32 and rounds; then the product rounds again.
    act = (gate.to(tl.float32) * tl.sigmoid(gate.to(tl.float32))).to(x_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, act * up, mask=ok)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[tokens, 2 * n] (gate then up, as the fused weight lays them out) -> silu(gate) * up."""
    gate_up = _rows(gate_up)
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block, num_warps=4,
    )
    return out


@triton.jit
def _rope_write_kv_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, k_cache_ptr, k_off, v_cache_ptr, v_off,
    q_norm_ptr, k_norm_ptr, eps, stride_qkv, stride_qo_t, stride_qo_h, stride_cos,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    tokens_per_page,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF_BLOCK: tl.constexpr, QK_NORM: tl.constexpr,
):
    """Program (token, head): head < NUM_HEADS rotates a query head into q_out; the next
    NUM_KV_HEADS rotate a key head into the cache; the last NUM_KV_HEADS copy a value head."""
    tok = tl.program_id(0)
    head = tl.program_id(1)
    half = HEAD_DIM // 2
    cols = tl.arange(0, HALF_BLOCK)
    ok = cols < half
    slot = tl.load(slot_ptr + tok)
    page = (slot // tokens_per_page).to(tl.int64)
    in_page = slot % tokens_per_page
    src = qkv_ptr + tok * stride_qkv + head * HEAD_DIM
    x1 = tl.load(src + cols, mask=ok, other=0.0)
    x2 = tl.load(src + half + cols, mask=ok, other=0.0)
    if head < NUM_HEADS + NUM_KV_HEADS:
        if QK_NORM:  # Qwen3: RMSNorm over each q and k head before the rotation
            xf1 = x1.to(tl.float32)
            xf2 = x2.to(tl.float32)
            inv = tl.rsqrt((tl.sum(xf1 * xf1, 0) + tl.sum(xf2 * xf2, 0)) / HEAD_DIM + eps)
            if head < NUM_HEADS:
                w1 = tl.load(q_norm_ptr + cols, mask=ok, other=0.0)
                w2 = tl.load(q_norm_ptr + half + cols, mask=ok, other=0.0)
            else:
                w1 = tl.load(k_norm_ptr + cols, mask=ok, other=0.0)
                w2 = tl.load(k_norm_ptr + half + cols, mask=ok, other=0.0)
            x1 = w1 * (xf1 * inv).to(x1.dtype)
            x2 = w2 * (xf2 * inv).to(x2.dtype)
        pos = tl.load(pos_ptr + tok)
        cos = tl.load(cos_ptr + pos * stride_cos + cols, mask=ok, other=0.0)
        sin = tl.load(sin_ptr + pos * stride_cos + cols, mask=ok, other=0.0)
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        y1 = (f1 * cos - f2 * sin).to(x1.dtype)
        y2 = (f2 * cos + f1 * sin).to(x1.dtype)
        if head < NUM_HEADS:
            dst = q_out_ptr + tok * stride_qo_t + head * stride_qo_h
            tl.store(dst + cols, y1, mask=ok)
            tl.store(dst + half + cols, y2, mask=ok)
        elif slot >= 0:  # slot -1: a padding row of a CUDA-graph batch, nothing to store
            kh = head - NUM_HEADS
            dst = k_cache_ptr + k_off + page * stride_kp + in_page * stride_ks + kh * stride_kh
            tl.store(dst + cols, y1.to(k_cache_ptr.dtype.element_ty), mask=ok)
            tl.store(dst + half + cols, y2.to(k_cache_ptr.dtype.element_ty), mask=ok)
    elif slot >= 0:
        vh = head - NUM_HEADS - NUM_KV_HEADS
        dst = v_cache_ptr + v_off + page * stride_vp + in_page * stride_vs + vh * stride_vh
        tl.store(dst + cols, x1.to(v_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + half + cols, x2.to(v_cache_ptr.dtype.element_ty), mask=ok)


def rope_and_write_kv(
    qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    num_heads: int, num_kv_heads: int, head_dim: int,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Rotate q and k (after Qwen3's per-head norm when `qk_norm` = (q weight, k weight, eps)) of a
    fused qkv [tokens, (H + 2 KV) * D] (rotate-half layout), store
    k and v at their cache slots, return the rotated q [tokens, H, D]."""
    tokens = qkv.shape[0]
    q = torch.empty((tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    tpp = k_cache.shape[1]
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (qkv, qkv, 0.0)
    _rope_write_kv_kernel[(tokens, num_heads + 2 * num_kv_heads)](
        qkv, positions, cos, sin, slot_mapping, q, *cache_pointer(k_cache), *cache_pointer(v_cache),
        q_norm, k_norm, eps, qkv.stride(0), q.stride(0), q.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        tpp, NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF_BLOCK=triton.next_power_of_2(max(1, head_dim // 2)), QK_NORM=qk_norm is not None,
        num_warps=1,
    )
    return q
