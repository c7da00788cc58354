"""Public MoE dispatch ops: validate, pick a backend, call the Triton or torch implementation.

Dimension legend: T tokens, k top-k slots, E experts (local experts for ``sort_chunks``),
H hidden size, C per-expert capacity, N permuted rows, R ranks, G groups, K reduction size,
M output columns.

Every op takes ``backend`` ("triton", "torch", "auto" or None; ``grouped_gemm`` also
"grouped_mm"; see ``_backend``). The modules that define Triton kernels are imported inside the
branches that use them, never at import time (``_chunks`` defers its own Triton import the same
way).
"""

from __future__ import annotations

import torch

from ._autocast import autocast_inputs
from ._backend import auto_backend, kernel_backend
from ._chunks import sort_chunks_ref, sort_chunks_triton
from ._grouped_gemm_ref import grouped_gemm_ref
from ._permute_ref import permute_ref, unpermute_ref
from ._routing import PermuteMap

__all__ = ["permute", "unpermute", "sort_chunks", "grouped_gemm"]


def permute(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    probs: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
    backend: str | None = None,
    kept_rows: int | None = None,
) -> PermuteMap:
    """Move token copies into expert-contiguous order.

    Args:
        x: [T, H] hidden states.
        topk_idx: [T, k] int64 expert ids in [0, E) (not range-checked: that would sync).
        probs: [T, k] router probabilities (any float dtype).
        num_experts: E.
        capacity: C (see ``capacity_for``), or None for dropless routing.
        drop_policy: with a capacity, "probs" keeps each expert's C most probable copies (ties
            go to the lower token index), "position" its first C copies by token index.
        pad_to_capacity: pad every expert with zero rows to exactly C rows.
        backend: "triton", "torch", "auto" or None.
        kept_rows: with a capacity and no padding, the kept-row count if already known on
            the host (``sum(min(counts, C))``); avoids the host synchronisation.

    Returns:
        ``PermuteMap`` with ``tokens`` [N, H]: N = T*k dropless (no host sync), E*C padded
        (no host sync), the kept-row count when dropping without padding (one host sync).
        Kept rows stay in token order within each expert.
    """
    if x.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"need x [T, H] and topk_idx [T, k], got {tuple(x.shape)}, "
                         f"{tuple(topk_idx.shape)}")  # fmt: skip
    if kernel_backend(x, backend) == "triton":
        from ._permute import permute_triton

        return permute_triton(
            x, topk_idx, probs, num_experts, capacity, drop_policy, pad_to_capacity, kept_rows
        )
    return permute_ref(
        x, topk_idx, probs, num_experts, capacity, drop_policy, pad_to_capacity, kept_rows
    )


def unpermute(
    y: torch.Tensor,
    perm: PermuteMap,
    probs: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Combine the k copies of every token: the inverse of ``permute``.

    Args:
        y: [N, H] rows laid out like ``perm.tokens`` (e.g. the expert outputs).
        perm: the ``PermuteMap`` returned by ``permute``.
        probs: [T, k] combine weights, or None for weight 1 (when the caller already applied
            them, e.g. through ``swiglu_experts(probs=perm.probs)``).
        backend: "triton", "torch", "auto" or None.

    Returns:
        [T, H] in y.dtype, ``out[t] = sum_j probs[t, j] * y[row_map[t, j]]`` over kept copies;
        dropped copies contribute zero. Differentiable in y and probs.
    """
    if y.dim() != 2 or y.shape[0] != perm.row_copy.shape[0]:
        raise ValueError(f"y must be [N, H] with N = {perm.row_copy.shape[0]}, "
                         f"got {tuple(y.shape)}")  # fmt: skip
    if probs is not None and probs.shape != perm.row_map.shape:
        raise ValueError(f"probs must be [T, k] = {tuple(perm.row_map.shape)}, "
                         f"got {tuple(probs.shape)}")  # fmt: skip
    if kernel_backend(y, backend) == "triton":
        from ._permute import unpermute_triton

        return unpermute_triton(y, perm, probs)
    return unpermute_ref(y, perm, probs)


def sort_chunks(
    x: torch.Tensor,
    split_sizes: torch.Tensor,
    num_ranks: int,
    num_local_experts: int,
    inverse: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Regroup rows between (rank, local expert) and (local expert, rank) chunk order.

    Args:
        x: [N, H] rows, chunks back to back.
        split_sizes: [R * E] int device tensor of chunk sizes, always indexed ``[r * E + e]``;
            its sum should be N (rows past the last chunk stay in place).
        num_ranks: R.
        num_local_experts: E.
        inverse: False: input ordered (r, e) -> output ordered (e, r). True: the way back.
        backend: "triton", "torch", "auto" or None.

    Returns:
        [N, H] in x.dtype. Differentiable in x (the backward is the opposite chunk sort).
    """
    if kernel_backend(x, backend) == "triton":
        return sort_chunks_triton(x, split_sizes, num_ranks, num_local_experts, inverse)
    return sort_chunks_ref(x, split_sizes, num_ranks, num_local_experts, inverse)


def grouped_gemm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str | None = None
) -> torch.Tensor:
    """One GEMM per group in a single call: ``y[offsets[g-1]:offsets[g]] = x[...] @ w[g]``.

    Args:
        x: [N, K]; w: [G, K, M] in x.dtype.
        offsets: [G] int device tensor, inclusive cumulative sum of the group sizes (empty
            groups allowed); rows past ``offsets[-1]`` give zero rows.
        backend: "triton", "torch", "grouped_mm", "auto" or None. The torch path reads the
            group sizes on the host (free on CPU, a sync on CUDA); the Triton and grouped_mm
            paths do not. "grouped_mm" (``torch._grouped_mm``) falls back to the next backend
            (triton on CUDA, torch elsewhere) where its rules exclude the case, logging why.

    Returns:
        y [N, M] in x.dtype (autocast's dtype under autocast, which casts float32 x and w as
        it casts a matmul's), accumulated in float32 for 16-bit inputs. Differentiable in x
        and w; groups without rows get a zero weight gradient.
    """
    x, w = autocast_inputs(x, w)
    groups, k_dim, m_dim = w.shape if w.dim() == 3 else (None, None, None)
    backend = kernel_backend(x, backend, op="grouped_gemm", k=k_dim, n=m_dim, groups=groups)
    if backend == "grouped_mm":
        backend = _grouped_mm_or_fallback(x, w, offsets)
        if backend == "grouped_mm":
            from ._grouped_mm import grouped_gemm_grouped_mm

            return grouped_gemm_grouped_mm(x, w, offsets)
    if backend == "triton":
        from ._grouped_gemm import grouped_gemm_triton

        return grouped_gemm_triton(x, w, offsets)
    return grouped_gemm_ref(x, w, offsets)


def _grouped_mm_or_fallback(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> str:
    """``"grouped_mm"`` when torch._grouped_mm takes the case, else the next backend (logged)."""
    from ._grouped_mm import grouped_mm_problem, log_fallback

    problem = grouped_mm_problem(x, w, offsets)
    if problem is None:
        return "grouped_mm"
    fallback = auto_backend(x.device, x.dtype)  # triton on CUDA (when it imports), else torch
    log_fallback(problem, fallback)
    return fallback
