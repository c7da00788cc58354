"""Chunk sort for expert parallelism: regroup rows between (rank, expert) and (expert, rank).

Dimension legend: N rows, H hidden size, R source ranks, E local experts; a *chunk* is the run of
rows one rank sends to one local expert, and ``split_sizes[r * E + e]`` is its length.

After the all-to-all every rank holds chunks ordered (rank r, expert e); the grouped GEMM wants
them ordered (expert e, rank r). The move is a permutation of rows, so it is computed as a
source-row index on the device (``searchsorted`` over the chunk boundaries: no host sync, the
output has N rows like the input) and applied by a row gather: ``index_select`` for the torch
path, the Triton ``gather_rows`` kernel otherwise. The backward of a chunk sort is the opposite
chunk sort.

This module does not import Triton at import time: the Triton gather is imported on first use.
"""

from __future__ import annotations

import torch

__all__ = ["chunk_source_rows", "sort_chunks_ref", "sort_chunks_triton"]


def chunk_source_rows(
    split_sizes: torch.Tensor,
    num_ranks: int,
    num_local_experts: int,
    num_rows: int,
    inverse: bool = False,
) -> torch.Tensor:
    """Source row of every output row of a chunk sort.

    Args:
        split_sizes: [R * E] int chunk sizes, indexed ``[r * E + e]`` in both directions.
        num_ranks: R.
        num_local_experts: E.
        num_rows: N, the row count of the buffer; expected to equal ``split_sizes.sum()``
            (not checked: that would sync). Rows past the last chunk stay where they are.
        inverse: False maps (r, e) order to (e, r) order; True maps (e, r) back to (r, e).

    Returns:
        [N] int64 ``src`` with ``out[i] = x[src[i]]``.
    """
    n_chunks = num_ranks * num_local_experts
    if split_sizes.dim() != 1 or split_sizes.shape[0] != n_chunks:
        raise ValueError(f"split_sizes must be [{n_chunks}] (R * E), got {split_sizes.shape}")
    by_rank = split_sizes.to(torch.int64).view(num_ranks, num_local_experts)
    by_expert = by_rank.t()
    in_sizes, out_sizes = (by_expert, by_rank) if inverse else (by_rank, by_expert)
    in_flat = in_sizes.reshape(-1)
    # Chunk starts in the input layout, re-read in output order so both tables line up.
    src_starts = (torch.cumsum(in_flat, 0) - in_flat).view_as(in_sizes).t().reshape(-1)
    out_flat = out_sizes.reshape(-1)
    out_ends = torch.cumsum(out_flat, 0)
    out_starts = out_ends - out_flat
    # A sentinel chunk starting at the total maps any rows past it onto themselves.
    total = out_ends[-1:]
    src_starts = torch.cat([src_starts, total])
    out_starts = torch.cat([out_starts, total])
    rows = torch.arange(num_rows, device=split_sizes.device)
    chunk = torch.searchsorted(out_ends, rows, right=True)
    return src_starts.index_select(0, chunk) + rows - out_starts.index_select(0, chunk)


class _SortChunks(torch.autograd.Function):
    """out = x[src]; the gradient goes back through the opposite chunk sort."""

    @staticmethod
    def forward(ctx, x, split_sizes, num_ranks, num_local_experts, inverse):
        from ._gather import gather_rows

        ctx.save_for_backward(split_sizes)
        ctx.layout = (num_ranks, num_local_experts, inverse)
        src = chunk_source_rows(split_sizes, num_ranks, num_local_experts, x.shape[0], inverse)
        return gather_rows(x, src, 1)[0]

    @staticmethod
    def backward(ctx, grad_out):
        from ._gather import gather_rows

        (split_sizes,) = ctx.saved_tensors
        num_ranks, num_local_experts, inverse = ctx.layout
        src = chunk_source_rows(
            split_sizes, num_ranks, num_local_experts, grad_out.shape[0], not inverse
        )
        return gather_rows(grad_out, src, 1)[0], None, None, None, None


def _check(x: torch.Tensor, num_ranks: int, num_local_experts: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [N, H], got {tuple(x.shape)}")
    if num_ranks <= 0 or num_local_experts <= 0:
        raise ValueError("num_ranks and num_local_experts must be positive")


def sort_chunks_ref(
    x: torch.Tensor,
    split_sizes: torch.Tensor,
    num_ranks: int,
    num_local_experts: int,
    inverse: bool = False,
) -> torch.Tensor:
    """Regroup the rows of x [N, H] by chunk (see ``foldmesh.kernels.sort_chunks``)."""
    _check(x, num_ranks, num_local_experts)
    src = chunk_source_rows(split_sizes, num_ranks, num_local_experts, x.shape[0], inverse)
    return x.index_select(0, src)


def sort_chunks_triton(
    x: torch.Tensor,
    split_sizes: torch.Tensor,
    num_ranks: int,
    num_local_experts: int,
    inverse: bool = False,
) -> torch.Tensor:
    """Triton twin of ``sort_chunks_ref`` (same arguments, same result)."""
    _check(x, num_ranks, num_local_experts)
    return _SortChunks.apply(x, split_sizes, num_ranks, num_local_experts, inverse)
