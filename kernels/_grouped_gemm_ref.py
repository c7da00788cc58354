"""Pure-torch grouped GEMM: the reference and the CPU path.

Dimension legend: N rows, K reduction size, M output columns, G groups.

One ``matmul`` per group over ``torch.split`` views; autograd comes from the torch ops, and a
group without rows gets a zero weight gradient from the empty matmul. It supports every dtype
torch.matmul does (float64 included, for gradcheck).
"""

from __future__ import annotations

import torch

__all__ = ["grouped_gemm_ref", "group_sizes", "check_grouped_gemm_args"]


def group_sizes(offsets: torch.Tensor) -> torch.Tensor:
    """[G] group sizes from the inclusive cumulative sum ``offsets`` [G] (on the device)."""
    offsets = offsets.to(torch.int64)
    return offsets - torch.nn.functional.pad(offsets[:-1], (1, 0))


def check_grouped_gemm_args(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    """The shape checks every backend shares: x [N, K], w [G, K, M], offsets [G]."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"need x [N, K] and w [G, K, M], got {tuple(x.shape)}, {tuple(w.shape)}")
    if offsets.shape != (w.shape[0],):
        raise ValueError(f"offsets must be [G] = [{w.shape[0]}], got {tuple(offsets.shape)}")


def grouped_gemm_ref(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``y[rows of g] = x[rows of g] @ w[g]`` for every group g (see ``grouped_gemm``).

    Args:
        x: [N, K]; w: [G, K, M] in x.dtype; offsets: [G] int, inclusive cumsum of group sizes.

    Returns:
        y [N, M] in x.dtype; rows past ``offsets[-1]`` are zero.
    """
    check_grouped_gemm_args(x, w, offsets)
    # NOTE: host sync. torch.split needs the group sizes on the host. On CPU, where this path
    # is the default, reading them is free; on CUDA the Triton kernel reads them on the device.
    sizes = group_sizes(offsets).tolist()
    tail = x.shape[0] - sum(sizes)
    if tail < 0:
        raise ValueError(f"offsets[-1] = {sum(sizes)} exceeds the {x.shape[0]} rows of x")
    parts = torch.split(x, [*sizes, tail])
    out = [part @ w[g] for g, part in enumerate(parts[:-1])]
    out.append(x.new_zeros(tail, w.shape[2]))
    return torch.cat(out)
