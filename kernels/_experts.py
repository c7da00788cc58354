"""SwiGLU expert FFN over all local experts: two grouped GEMMs around a fused activation.

Dimension legend: N permuted rows, H hidden size, F intermediate size (the local shard under
expert tensor parallelism), G local experts.

Per expert g, on its rows: ``out = (silu(x @ Wg) * (x @ Wu) [* p]) @ Wd`` where ``w_gate_up[g]``
is ``[Wg | Wu]`` (gate in the first F columns) and ``w_down[g]`` is ``Wd``. The probability
weighting, when given, is folded into the activation (one pass over [N, F]) rather than into a
GEMM epilogue: the epilogue variants are only worth their complexity if a GPU run shows a gain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._autocast import autocast_inputs
from ._backend import auto_backend, kernel_backend
from ._ops import grouped_gemm

__all__ = ["swiglu", "swiglu_ref", "swiglu_experts"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def swiglu_ref(h: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up [* probs]`` for h [N, 2F] = [gate | up], probs [N] -> [N, F].

    16-bit inputs are computed in float32 and rounded once, like the Triton kernel.
    """
    if h.dim() != 2 or h.shape[1] % 2:
        raise ValueError(f"h must be [N, 2F], got {tuple(h.shape)}")
    compute = torch.float32 if h.dtype in _LOW_PRECISION else h.dtype
    gate, up = h.to(compute).chunk(2, dim=1)
    a = F.silu(gate) * up
    if probs is not None:
        a = a * probs.to(compute).unsqueeze(1)
    return a.to(h.dtype)


def swiglu(
    h: torch.Tensor, probs: torch.Tensor | None = None, backend: str | None = None
) -> torch.Tensor:
    """SwiGLU activation with optional row weights; see ``swiglu_ref`` for shapes."""
    if kernel_backend(h, backend) == "triton":
        from ._swiglu import swiglu_triton

        return swiglu_triton(h, probs)
    return swiglu_ref(h, probs)


def swiglu_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    counts: torch.Tensor,
    probs: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """SwiGLU FFN of every expert on its contiguous rows of x.

    Args:
        x: [N, H] expert-contiguous rows (e.g. ``PermuteMap.tokens``).
        w_gate_up: [G, H, 2F] in x.dtype, gate in the first F columns, up in the last F.
        w_down: [G, F, H] in x.dtype.
        counts: [G] int64 device tensor, rows per expert (e.g. ``PermuteMap.counts``); rows
            past ``counts.sum()`` give zero rows.
        probs: [N] per-row weights applied before the down projection (e.g.
            ``PermuteMap.probs``), or None.
        backend: "triton", "torch", "grouped_mm", "auto" or None. With "grouped_mm" both
            GEMMs run on ``torch._grouped_mm`` (each falling back on its own, logged, where
            its rules exclude the case) and the activation runs on the Triton ``swiglu`` on
            CUDA when Triton imports, on ``swiglu_ref`` otherwise.

    Returns:
        [N, H] in x.dtype (autocast's dtype under autocast, as ``grouped_gemm``);
        differentiable in x, both weights and probs.
    """
    if w_gate_up.dim() != 3 or w_down.dim() != 3 or w_gate_up.shape[2] != 2 * w_down.shape[1]:
        raise ValueError(f"need w_gate_up [G, H, 2F] and w_down [G, F, H], got "
                         f"{tuple(w_gate_up.shape)}, {tuple(w_down.shape)}")  # fmt: skip
    x, w_gate_up, w_down = autocast_inputs(x, w_gate_up, w_down)  # once for both GEMMs
    groups, hidden, ffn = w_down.shape[0], w_gate_up.shape[1], w_down.shape[1]
    backend = kernel_backend(x, backend, op="swiglu_experts", k=hidden, n=ffn, groups=groups)
    # The activation has no grouped_mm kernel: it takes what auto means for h's device.
    act = auto_backend(x.device, x.dtype) if backend == "grouped_mm" else backend
    offsets = torch.cumsum(counts, 0)
    h = grouped_gemm(x, w_gate_up, offsets, backend=backend)
    return grouped_gemm(swiglu(h, probs, backend=act), w_down, offsets, backend=backend)
