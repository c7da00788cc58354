"""Pure-torch permute/unpermute: the reference and the CPU path.

Dimension legend: T tokens, k top-k slots, E experts, H hidden size, N permuted rows.

Autograd comes from the torch ops themselves. The dropless path never synchronises with the
host (sorts, scans and ``index_select`` only); see ``_routing.build_routing`` for the one sync
of the dropping-without-padding path.
"""

from __future__ import annotations

import torch

from ._routing import PermuteMap, build_routing

__all__ = ["permute_ref", "unpermute_ref"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    """Append one zero row, so that an out-of-range index reads zeros instead of needing a mask."""
    return torch.cat([t, t.new_zeros(1, *t.shape[1:])])


def permute_ref(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    probs: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
    kept_rows: int | None = None,
) -> PermuteMap:
    """Reorder token copies into expert-contiguous rows (see ``foldmesh.kernels.permute``).

    Args:
        x: [T, H] hidden states, any float dtype.
        topk_idx: [T, k] int64 expert ids.
        probs: [T, k] router probabilities.
        num_experts: E.
        capacity: per-expert capacity C, or None for dropless routing.
        drop_policy: "probs" or "position" (used only with a capacity).
        pad_to_capacity: pad every expert to exactly C rows.

    Returns:
        A ``PermuteMap`` whose ``tokens`` are [N, H] in x.dtype.
    """
    routing = build_routing(
        topk_idx, probs, num_experts, capacity, drop_policy, pad_to_capacity, kept_rows
    )
    topk = topk_idx.shape[1]
    if routing.padded:
        source = torch.where(routing.row_copy >= 0, routing.row_copy // topk, x.shape[0])
        tokens = _with_zero_row(x).index_select(0, source)
    else:
        tokens = x.index_select(0, routing.row_copy // topk)
    return routing.finish(tokens, probs)


def unpermute_ref(
    y: torch.Tensor, perm: PermuteMap, probs: torch.Tensor | None = None
) -> torch.Tensor:
    """Combine the k copies of every token (see ``foldmesh.kernels.unpermute``).

    Args:
        y: [N, H] rows in the layout of ``perm.tokens`` (typically the expert outputs).
        perm: the ``PermuteMap`` that produced the layout.
        probs: [T, k] weights, or None for weight 1 on every kept copy.

    Returns:
        [T, H] in y.dtype: ``out[t] = sum_j probs[t, j] * y[row_map[t, j]]`` over kept copies.
        float16/bfloat16 inputs are summed in float32 and rounded once, like the Triton kernel.
    """
    num_tokens, topk = perm.row_map.shape
    rows = perm.row_map.reshape(-1)
    acc_dtype = torch.float32 if y.dtype in _LOW_PRECISION else y.dtype
    if perm.may_drop:
        # Dropped copies read an appended zero row: they contribute exactly nothing, even when
        # y holds non-finite values, and send no gradient anywhere.
        kept = rows >= 0
        gathered = _with_zero_row(y).index_select(0, torch.where(kept, rows, y.shape[0]))
        weights = kept.to(acc_dtype) if probs is None else probs.reshape(-1).to(acc_dtype) * kept
    else:
        gathered = y.index_select(0, rows)
        weights = None if probs is None else probs.reshape(-1).to(acc_dtype)
    gathered = gathered.to(acc_dtype).view(num_tokens, topk, y.shape[1])
    if weights is None:
        out = gathered.sum(dim=1)
    else:
        out = torch.bmm(weights.view(num_tokens, 1, topk), gathered).squeeze(1)
    return out.to(y.dtype)
