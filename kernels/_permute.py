"""Triton permute/unpermute: autograd Functions over the row kernels of ``_gather``.

Dimension legend: T tokens, k top-k slots, E experts, H hidden size, N permuted rows.

The two ops are each other's adjoint, so each backward is the other's forward kernel:

* permute forward gathers rows (``gather_rows``); its backward sums the k row gradients of each
  token (``gather_sum`` without weights).
* unpermute forward is a weighted gather-sum (``gather_sum``); its backward gathers the output
  gradient back into the permuted layout, scaled by the probabilities, and in the same pass
  computes the probability gradient ``<grad_out[t], y[row]>`` per copy (``gather_rows`` with a
  fused dot), so the expert outputs are read once.

Routing metadata comes from ``_routing`` (torch ops on the device), shared with the reference.
"""

from __future__ import annotations

import torch

from ._gather import gather_rows, gather_sum
from ._routing import PermuteMap, build_routing

__all__ = ["permute_triton", "unpermute_triton"]


class _PermuteRows(torch.autograd.Function):
    """tokens[n] = x[row_copy[n] // k] (zero for padding rows)."""

    @staticmethod
    def forward(ctx, x, row_copy, row_map):
        ctx.save_for_backward(row_map)
        tokens, _ = gather_rows(x, row_copy, row_map.shape[1])
        return tokens

    @staticmethod
    def backward(ctx, grad_tokens):
        (row_map,) = ctx.saved_tensors
        return gather_sum(grad_tokens, row_map), None, None


class _UnpermuteRows(torch.autograd.Function):
    """out[t] = sum_j probs[t, j] * y[row_map[t, j]] over kept copies."""

    @staticmethod
    def forward(ctx, y, probs, row_map, row_copy):
        want_dprobs = probs is not None and ctx.needs_input_grad[1]
        # y is only needed for the probability gradient; do not keep it alive otherwise.
        ctx.save_for_backward(probs, row_map, row_copy, y if want_dprobs else None)
        ctx.num_y_rows = y.shape[0]
        return gather_sum(y, row_map, probs)

    @staticmethod
    def backward(ctx, grad_out):
        probs, row_map, row_copy, y = ctx.saved_tensors
        flat_probs = probs.reshape(-1) if probs is not None else None
        grad_y, dot = gather_rows(grad_out, row_copy, row_map.shape[1], scale=flat_probs, other=y)
        grad_probs = None
        if dot is not None:
            grad_probs = dot.view_as(probs).to(probs.dtype)
        return grad_y, grad_probs, None, None


def permute_triton(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    probs: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
    kept_rows: int | None = None,
) -> PermuteMap:
    """Triton twin of ``permute_ref`` (same arguments, same result)."""
    routing = build_routing(
        topk_idx, probs, num_experts, capacity, drop_policy, pad_to_capacity, kept_rows
    )
    tokens = _PermuteRows.apply(x, routing.row_copy, routing.row_map)
    return routing.finish(tokens, probs)


def unpermute_triton(
    y: torch.Tensor, perm: PermuteMap, probs: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton twin of ``unpermute_ref`` (same arguments, same result)."""
    if y.shape[0] != perm.row_copy.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows, the permutation {perm.row_copy.shape[0]}")
    return _UnpermuteRows.apply(y, probs, perm.row_map, perm.row_copy)
