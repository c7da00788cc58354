"""Routing metadata for permute/unpermute: who goes where, computed on the device.

Dimension legend: T tokens, k top-k slots per token, E experts, H hidden size, C per-expert
capacity, N rows of the permuted buffer (T*k dropless, kept rows when dropping, E*C padded).
A *copy* is one (token t, slot j) pair; its flat index is ``t * k + j``.

Both backends share this module: the metadata is a handful of sorts and scans over T*k integers,
while the backends differ only in how they move the [T, H] rows (``index_select`` vs a Triton
row-gather kernel). Everything here stays on the device; the only host synchronisation is the
output size of the dropping-without-padding path, marked below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PermuteMap", "Routing", "build_routing", "capacity_for", "DROP_POLICIES"]

DROP_POLICIES = ("probs", "position")


def capacity_for(num_tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    """Per-expert capacity ``C = ceil(T * k / E * capacity_factor)``.

    This is the Megatron/GShard convention: an expert may take ``capacity_factor`` times its
    share of the T*k routed copies under perfectly balanced routing.
    """
    if num_experts <= 0 or topk <= 0 or num_tokens < 0:
        raise ValueError("need num_experts > 0, topk > 0 and num_tokens >= 0")
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    return math.ceil(num_tokens * topk / num_experts * capacity_factor)


@dataclass(frozen=True, eq=False)
class PermuteMap:
    """Result of ``permute``: the permuted rows plus everything ``unpermute`` needs.

    Attributes:
        tokens: [N, H], dtype of x. Expert-contiguous; within an expert ordered by token index.
            Padding rows (``pad_to_capacity``) are zero.
        probs: [N], dtype of the router probabilities; 0 for padding rows. Differentiable
            with respect to the router probabilities.
        counts: [E] int64. Rows per expert in ``tokens`` (each equals C when padded).
        offsets: [E] int64, inclusive cumulative sum of ``counts`` (the grouped GEMM's offsets).
        row_map: [T, k] int64. Row of ``tokens`` holding copy (t, j); -1 if the copy was dropped.
        row_copy: [N] int64. Flat copy index ``t * k + j`` feeding each row; -1 for padding rows.
        capacity: C, or None for dropless routing.
        padded: True when every expert was padded to exactly C rows (``pad_to_capacity``).
    """

    tokens: torch.Tensor
    probs: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    row_map: torch.Tensor
    row_copy: torch.Tensor
    capacity: int | None = None
    padded: bool = False

    @property
    def num_tokens(self) -> int:
        return self.row_map.shape[0]

    @property
    def topk(self) -> int:
        return self.row_map.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def may_drop(self) -> bool:
        """True when some copies may have been dropped (row_map == -1)."""
        return self.capacity is not None


@dataclass(frozen=True, eq=False)
class Routing:
    """Index tensors of a permutation, before any row has moved (see ``PermuteMap``)."""

    row_map: torch.Tensor
    row_copy: torch.Tensor
    counts: torch.Tensor
    capacity: int | None
    padded: bool

    def finish(self, tokens: torch.Tensor, probs: torch.Tensor) -> PermuteMap:
        """Attach the permuted rows and gather the probabilities into a ``PermuteMap``."""
        flat = probs.reshape(-1)
        if self.padded:
            # Route padding rows to an appended zero so they read 0 without a masked copy.
            flat = torch.cat([flat, flat.new_zeros(1)])
            index = torch.where(self.row_copy >= 0, self.row_copy, flat.shape[0] - 1)
        else:
            index = self.row_copy
        return PermuteMap(
            tokens=tokens,
            probs=flat.index_select(0, index),
            counts=self.counts,
            offsets=torch.cumsum(self.counts, 0),
            row_map=self.row_map,
            row_copy=self.row_copy,
            capacity=self.capacity,
            padded=self.padded,
        )


def _scatter_back(order: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Inverse of a gather by ``order``: ``out[order[i]] = values[i]``."""
    return torch.empty_like(values).scatter_(0, order, values)


def build_routing(
    topk_idx: torch.Tensor,
    probs: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    drop_policy: str = "probs",
    pad_to_capacity: bool = False,
    kept_rows: int | None = None,
) -> Routing:
    """Compute where every copy goes.

    Args:
        topk_idx: [T, k] int64 expert ids in [0, E). Not range-checked (that would sync).
        probs: [T, k] router probabilities; only read by ``drop_policy="probs"``.
        num_experts: E.
        capacity: C, or None for dropless routing.
        drop_policy: "probs" keeps each expert's C most probable copies (ties: lower token
            index), "position" keeps its first C copies by token index.
        pad_to_capacity: give every expert exactly C rows (zero padding), so N = E * C.
        kept_rows: dropping without padding only: the number of kept copies,
            ``sum(min(count_e, C))``, when the caller already has it on the host (the MoE
            dispatcher learns it from its one count exchange); skips this function's sync.
    """
    if topk_idx.dim() != 2 or probs.shape != topk_idx.shape:
        raise ValueError(f"topk_idx and probs must both be [T, k], got {topk_idx.shape}, "
                         f"{probs.shape}")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    if pad_to_capacity and capacity is None:
        raise ValueError("pad_to_capacity needs a capacity")
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be non-negative, got {capacity}")

    num_tokens, topk = topk_idx.shape
    device = topk_idx.device
    experts = topk_idx.reshape(-1).to(torch.int64)
    n_copies = experts.shape[0]
    position = torch.arange(n_copies, device=device)
    # A stable sort of the expert ids puts copies in (expert, token, slot) order, which is
    # exactly the dropless layout: counts and offsets follow without any host round trip.
    order = torch.argsort(experts, stable=True)
    sorted_experts = experts.index_select(0, order)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))

    if capacity is None:
        row_map = _scatter_back(order, position)
        return Routing(row_map.view(num_tokens, topk), order, counts, None, False)

    starts = torch.cumsum(counts, 0) - counts
    if drop_policy == "position":
        keep_sorted = position - starts.index_select(0, sorted_experts) < capacity
    else:
        # Rank copies within their expert by descending probability: a stable descending sort
        # keeps equal probabilities in flat-index (= token) order, then a stable sort by expert
        # groups them without disturbing that ranking.
        by_prob = torch.sort(probs.reshape(-1), descending=True, stable=True).indices
        order_p = by_prob.index_select(
            0, torch.argsort(experts.index_select(0, by_prob), stable=True)
        )
        rank_p = position - starts.index_select(0, experts.index_select(0, order_p))
        keep_sorted = _scatter_back(order_p, rank_p < capacity).index_select(0, order)

    kept_counts = counts.clamp(max=capacity)
    kept_before = torch.cumsum(keep_sorted.to(torch.int64), 0) - 1
    if pad_to_capacity:
        kept_starts = torch.cumsum(kept_counts, 0) - kept_counts
        rank_kept = kept_before - kept_starts.index_select(0, sorted_experts)
        dest = sorted_experts * capacity + rank_kept
        n_rows = num_experts * capacity
        out_counts = torch.full_like(counts, capacity)
    else:
        dest = kept_before
        # NOTE: host sync. Without padding the kept-row count sizes the output buffer, and a
        # tensor's shape must be known on the host; pad_to_capacity or kept_rows avoids it.
        n_rows = int(kept_counts.sum()) if kept_rows is None else kept_rows
        out_counts = kept_counts

    dest = torch.where(keep_sorted, dest, -1)
    row_map = _scatter_back(order, dest).view(num_tokens, topk)
    # Dropped copies all land in a spare last slot that is then cut off.
    row_copy = torch.full((n_rows + 1,), -1, dtype=torch.int64, device=device)
    row_copy.scatter_(0, torch.where(keep_sorted, dest, n_rows), order)
    return Routing(row_map, row_copy[:n_rows], out_counts, capacity, pad_to_capacity)
