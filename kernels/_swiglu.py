"""Triton SwiGLU activation with the optional per-row probability weighting fused in.

Dimension legend: N rows, F intermediate size (per expert shard); h [N, 2F] holds the gate in its
first F columns and the up projection in its last F.

``a[n] = silu(gate[n]) * up[n] * p[n]``. Unfused, torch makes three passes over [N, F] and keeps
their intermediates for backward; here the forward reads h once and writes a once, and the
backward recomputes the activation from h (nothing else is saved) and produces dh and the
probability gradient ``dp[n] = <da[n], silu(gate[n]) * up[n]>`` in one pass, one program per row
so the row sum needs no atomics. Everything is computed in float32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._gather import row_block

__all__ = ["swiglu_triton"]


@triton.jit
def _swiglu_fwd_kernel(
    h_ptr, p_ptr, a_ptr, F, stride_h, stride_a,
    HAS_PROBS: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    ok = cols < F
    gate = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + F + cols, mask=ok, other=0.0).to(tl.float32)
    a = gate * tl.sigmoid(gate) * up
    if HAS_PROBS:
        a *= tl.load(p_ptr + row).to(tl.float32)
    tl.store(a_ptr + row * stride_a + cols, a.to(a_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(
    h_ptr, p_ptr, da_ptr, dh_ptr, dp_ptr, F, stride_h, stride_da, stride_dh,
    HAS_PROBS: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    p = 1.0
    if HAS_PROBS:
        p = tl.load(p_ptr + row).to(tl.float32)
    dp = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for start in range(0, F, BLOCK_F):
        cols = start + tl.arange(0, BLOCK_F)
        ok = cols < F
        gate = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + F + cols, mask=ok, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + row * stride_da + cols, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        d_act = da * p
        d_gate = d_act * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(dh_ptr + row * stride_dh + cols, d_gate.to(dh_ptr.dtype.element_ty), mask=ok)
        tl.store(dh_ptr + row * stride_dh + F + cols, (d_act * silu).to(dh_ptr.dtype.element_ty),
                 mask=ok)  # fmt: skip
        if HAS_PROBS:
            dp += da * silu * up
    if HAS_PROBS:
        tl.store(dp_ptr + row, tl.sum(dp, axis=0))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, probs):
        h = h if h.stride(-1) == 1 else h.contiguous()
        n_rows, width = h.shape[0], h.shape[1] // 2
        a = torch.empty((n_rows, width), dtype=h.dtype, device=h.device)
        ctx.save_for_backward(h, probs)
        if a.numel() == 0:
            return a
        block, num_warps = row_block(width, h.element_size())
        _swiglu_fwd_kernel[(n_rows, triton.cdiv(width, block))](
            h, probs if probs is not None else h, a, width, h.stride(0), a.stride(0),
            HAS_PROBS=probs is not None, BLOCK_F=block, num_warps=num_warps,
        )  # fmt: skip
        return a

    @staticmethod
    def backward(ctx, da):
        h, probs = ctx.saved_tensors
        da = da if da.stride(-1) == 1 else da.contiguous()
        n_rows, width = h.shape[0], h.shape[1] // 2
        dh = torch.empty_like(h)
        has_probs = probs is not None
        dp = torch.zeros(n_rows if has_probs else 0, dtype=torch.float32, device=h.device)
        if h.numel() > 0:
            block, num_warps = row_block(width, h.element_size())
            _swiglu_bwd_kernel[(n_rows,)](
                h, probs if has_probs else h, da, dh, dp if has_probs else h, width,
                h.stride(0), da.stride(0), dh.stride(0),
                HAS_PROBS=has_probs, BLOCK_F=block, num_warps=num_warps,
            )  # fmt: skip
        dprobs = dp.to(probs.dtype) if has_probs and ctx.needs_input_grad[1] else None
        return dh, dprobs


def swiglu_triton(h: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of ``swiglu_ref``: h [N, 2F], probs [N] or None -> [N, F] in h.dtype."""
    if h.dim() != 2 or h.shape[1] % 2:
        raise ValueError(f"h must be [N, 2F], got {tuple(h.shape)}")
    if probs is not None and probs.shape != (h.shape[0],):
        raise ValueError(f"probs must be [N] = [{h.shape[0]}], got {tuple(probs.shape)}")
    return _SwiGLU.apply(h, probs)
