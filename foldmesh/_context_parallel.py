"""Causal attention over a sequence split across the cp ranks (load-balanced chunks).

Dimension legend: B local batch, Hq / Hkv local heads, C chunk length, D head size,
cp context-parallel ranks; a rank's queries are its two chunks (2C tokens, see _sequence.py).

Keys and values are all-gathered over cp (one all-gather each per layer forward, their
gradients reduce-scattered in backward), put back in natural order, and each local chunk j
attends to the keys of chunks 0..j with a bottom-right-aligned causal mask. Memory: the
gathered K and V hold 2·B·S·Hkv·D elements per layer (kept for backward), cp times the local
K and V; with grouped-query attention they are gathered before heads are repeated.
A ring exchange would keep only two chunks at a time at the price of 2·cp-2 point-to-point
steps per layer; the all-gather is what Megatron-Core uses for GQA models too.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from ._mesh import FoldedMesh

_all_gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd


class ContextParallelAttention:
    """Drop-in ``Attention.core`` for cp > 1: q, k, v [B, heads, 2C, D] -> [B, Hq, 2C, D]."""

    def __init__(self, fm: FoldedMesh):
        self.cp = fm.fold.cp
        self.rank = fm.coordinate("cp")
        self.group = fm["cp"].get_group()
        # rank r holds chunks (r, 2cp-1-r); after the gather, slot 2r+i holds chunk order[2r+i]
        order = [c for r in range(self.cp) for c in (r, 2 * self.cp - 1 - r)]
        self.natural = [order.index(c) for c in range(2 * self.cp)]

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, 2C, D] on every cp rank -> [B, H, S, D] in natural order."""
        g = _all_gather(t.contiguous(), 2, self.group)  # [B, H, cp*2C, D], rank-major
        chunks = g.chunk(2 * self.cp, dim=2)
        return torch.cat([chunks[i] for i in self.natural], dim=2)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # imported here: torch.nn.attention.bias imports Triton, which foldmesh never loads
        # unless a kernel needs it
        from torch.nn.attention.bias import causal_lower_right

        c = q.shape[2] // 2
        k, v = self._gather(k), self._gather(v)
        gqa = q.shape[1] != k.shape[1]
        outs = []
        for i, j in enumerate((self.rank, 2 * self.cp - 1 - self.rank)):
            n = (j + 1) * c  # chunk j sees the keys of chunks 0..j
            qi = q[:, :, i * c:(i + 1) * c]
            # CausalBias is a Tensor subclass built by the legacy constructor, which fails
            # under an active TorchDispatchMode (CollectiveCounter, FakeTensorMode): build it
            # outside any mode. It holds no data, only the two lengths.
            with _disable_current_modes():
                mask = causal_lower_right(c, n)
            outs.append(F.scaled_dot_product_attention(
                qi, k[:, :, :n], v[:, :, :n], attn_mask=mask, enable_gqa=gqa))
        return torch.cat(outs, dim=2)
