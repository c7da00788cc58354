"""Triton row-movement kernels shared by permute, unpermute and chunk sort.

Dimension legend: T tokens, k top-k slots, H hidden size, N rows of the permuted buffer.

Two memory-bound kernels, one program per (row, H-block) of up to 8 KiB:

* ``gather_rows``: ``out[n] = scale[c] * src[c // k]`` where ``c = copy[n]`` (a copy index;
  -1 writes a zero row). Used by permute (k = top-k, no scale), by chunk sort (k = 1) and by the
  unpermute backward, which also fuses the probability gradient ``dot[c] = <src[c // k],
  other[n]>``; that dot needs the whole row, so the fused variant runs one program per row.
* ``gather_sum``: ``out[t] = sum_j w[t, j] * src[row_map[t, j]]`` with an fp32 accumulator, a
  gather-and-sum instead of an atomic scatter (deterministic, no zero-fill pass). Used by the
  unpermute forward and by the permute backward.

This module imports Triton at import time; the public ops import it only once the Triton backend
has been selected.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpret_mode

__all__ = ["gather_rows", "gather_sum", "row_block"]


@triton.jit
def _gather_block(
    src_ptr, out_ptr, other_ptr, src_row, row, cols, H, src_len, scale,
    stride_src, stride_out, stride_other, HAS_SCALE: tl.constexpr, HAS_DOT: tl.constexpr,
):  # fmt: skip
    """Move one block of one row; return its float32 share of the row dot (0 without HAS_DOT)."""
    v = tl.load(src_ptr + src_row * stride_src + cols, mask=cols < src_len, other=0.0)
    part = tl.zeros(cols.shape, dtype=tl.float32)
    if HAS_DOT:
        o = tl.load(other_ptr + row * stride_other + cols, mask=cols < src_len, other=0.0)
        part = v.to(tl.float32) * o.to(tl.float32)
    if HAS_SCALE:
        v = v.to(tl.float32) * scale
    tl.store(out_ptr + row * stride_out + cols, v.to(out_ptr.dtype.element_ty), mask=cols < H)
    return part


@triton.jit
def _gather_rows_kernel(
    src_ptr, out_ptr, copy_ptr, scale_ptr, other_ptr, dot_ptr,
    H, stride_src, stride_out, stride_other,
    TOPK: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DOT: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    copy = tl.load(copy_ptr + row)
    valid = copy >= 0
    src_row = tl.where(valid, copy // TOPK, 0)
    # A padding row reads nothing: its readable length is 0 instead of H. (One comparison,
    # which also sidesteps the interpreter's broken block-and-scalar boolean `&`.)
    src_len = tl.where(valid, H, 0)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr + copy, mask=valid, other=0.0).to(tl.float32)
    cols = tl.arange(0, BLOCK_H)
    if HAS_DOT:  # the dot needs the whole row, so one program walks all of it
        dot = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for start in range(0, H, BLOCK_H):
            dot += _gather_block(
                src_ptr, out_ptr, other_ptr, src_row, row, start + cols, H, src_len, scale,
                stride_src, stride_out, stride_other, HAS_SCALE, HAS_DOT,
            )  # fmt: skip
        tl.store(dot_ptr + copy, tl.sum(dot, axis=0), mask=valid)
    else:  # one block per program
        _gather_block(
            src_ptr, out_ptr, other_ptr, src_row, row, tl.program_id(1) * BLOCK_H + cols, H,
            src_len, scale, stride_src, stride_out, stride_other, HAS_SCALE, HAS_DOT,
        )  # fmt: skip


@triton.jit
def _gather_sum_kernel(
    src_ptr, out_ptr, row_map_ptr, weight_ptr,
    H, stride_src, stride_out,
    TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_row = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(row_map_ptr + token * TOPK + j)
        kept = row >= 0
        src_len = tl.where(kept, H, 0)
        v = tl.load(
            src_ptr + tl.where(kept, row, 0) * stride_src + cols, mask=cols < src_len, other=0.0
        ).to(tl.float32)
        if HAS_WEIGHT:
            v *= tl.load(weight_ptr + token * TOPK + j, mask=kept, other=0.0).to(tl.float32)
        acc += v
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=in_row)


# Bytes of one row each program moves: with 8 warps that is two 128-bit accesses per thread in
# flight. A starting point chosen by reasoning, to be confirmed by scripts/bench_kernels.py.
_ROW_BLOCK_BYTES = 8192


def row_block(width: int, element_size: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for the row kernels, for rows of ``width`` elements.

    The interpreter pays per program, so it takes the whole row at once with one warp.
    """
    block = triton.next_power_of_2(max(width, 1))
    if interpret_mode():
        return block, 1
    block = min(block, _ROW_BLOCK_BYTES // element_size)
    return block, max(1, min(8, block * element_size // (2 * 16 * 32)))


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def gather_rows(
    src: torch.Tensor,
    copy: torch.Tensor,
    topk: int,
    scale: torch.Tensor | None = None,
    other: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gather ``src`` rows by copy index, optionally scaled, optionally with a fused row dot.

    Args:
        src: [S, H] source rows (S = T for copy-indexed sources).
        copy: [N] int64 copy indices ``t * topk + j``; -1 writes a zero row.
        topk: k, the number of copies per source row (1 for a plain row gather).
        scale: [S * topk] per-copy factors, or None.
        other: [N, H] rows to dot with the *unscaled* gathered rows, or None.

    Returns:
        ``out`` [N, H] in src.dtype, and with ``other`` the float32 [S * topk] dot products
        (0 for copies that no row references), else None.
    """
    src = _row_major(src)
    n_rows, hidden = copy.shape[0], src.shape[1]
    out = torch.empty((n_rows, hidden), dtype=src.dtype, device=src.device)
    dot = None
    if other is not None:
        other = _row_major(other)
        dot = torch.zeros(src.shape[0] * topk, dtype=torch.float32, device=src.device)
    if n_rows == 0 or hidden == 0:
        return out, dot
    block_h, num_warps = row_block(hidden, src.element_size())
    h_programs = 1 if other is not None else triton.cdiv(hidden, block_h)
    _gather_rows_kernel[(n_rows, h_programs)](
        src, out, copy,
        scale if scale is not None else src,
        other if other is not None else src,
        dot if dot is not None else out,
        hidden, src.stride(0), out.stride(0), other.stride(0) if other is not None else 0,
        TOPK=topk, HAS_SCALE=scale is not None, HAS_DOT=other is not None,
        BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip
    return out, dot


def gather_sum(
    src: torch.Tensor, row_map: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[t] = sum_j weight[t, j] * src[row_map[t, j]]`` over ``row_map >= 0``.

    Args:
        src: [N, H] permuted rows.
        row_map: [T, k] int64 rows of ``src``, -1 for dropped copies.
        weight: [T, k] weights, or None for 1.

    Returns:
        [T, H] in src.dtype, accumulated in float32.
    """
    src = _row_major(src)
    n_tokens, topk = row_map.shape
    hidden = src.shape[1]
    out = torch.empty((n_tokens, hidden), dtype=src.dtype, device=src.device)
    if n_tokens == 0 or hidden == 0:
        return out
    block_h, num_warps = row_block(hidden, src.element_size())
    _gather_sum_kernel[(n_tokens, triton.cdiv(hidden, block_h))](
        src, out, row_map.contiguous(), weight.contiguous() if weight is not None else src,
        hidden, src.stride(0), out.stride(0),
        TOPK=topk, HAS_WEIGHT=weight is not None, BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip
    return out
