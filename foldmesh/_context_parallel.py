"""Causal attention over a sequence split across the cp ranks (load-balanced chunks).

Dimension legend: B local batch, Hq / Hkv local heads, C chunk length, D head size,
cp context-parallel ranks, S = 2·cp·C; a rank's queries are its two chunks (2C tokens, see
_sequence.py). MLA: Rkv ``kv_lora_rank``, Dr ``qk_rope_head_dim``.

Grouped-query attention (``ContextParallelAttention``): keys and values are all-gathered
over cp (one all-gather each per layer forward, their gradients reduce-scattered in
backward), put back in natural order, and each local chunk j attends to the keys of chunks
0..j with a bottom-right-aligned causal mask. Memory: the gathered K and V hold
2·B·S·Hkv·D elements per layer (kept for backward), cp times the local K and V; with
grouped-query attention they are gathered before heads are repeated. A ring exchange would
keep only two chunks at a time at the price of 2·cp-2 point-to-point steps per layer; the
all-gather is what Megatron-Core uses for GQA models too.

Multi-head Latent Attention (``LatentExchange`` as ``MLAttention.kv_exchange``, with
``ContextParallelAttention.attend`` as its ``core``): what is all-gathered is what every
head's key and value are expanded from, the normalised latent and the rotated shared key,
Rkv + Dr values per token in one all-gather, instead of 2·Hkv/tp·D-sized K and V; each rank
then runs ``kv_b_proj`` on all S positions for its own heads (docs/placements.md, "Multi-head
Latent Attention"). The rotated key is rotated before the gather, at the positions of the
tokens this rank holds, so the gathered keys carry their own positions and no position is
recomputed after the gather.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.utils._python_dispatch import _disable_current_modes

from ._mesh import FoldedMesh

_all_gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd


class _CpSequence:
    """The cp group and the load-balanced chunk order of one folded mesh."""

    def __init__(self, fm: FoldedMesh):
        self.cp = fm.fold.cp
        self.rank = fm.coordinate("cp")
        self.group = fm["cp"].get_group()
        # rank r holds chunks (r, 2cp-1-r); after the gather, slot 2r+i holds chunk order[2r+i]
        order = [c for r in range(self.cp) for c in (r, 2 * self.cp - 1 - r)]
        self.natural = [order.index(c) for c in range(2 * self.cp)]

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's 2C tokens along ``dim`` -> all S tokens in natural order (all-gather
        over cp; backward: reduce-scatter over cp)."""
        g = _all_gather(t.contiguous(), dim, self.group)  # cp·2C along dim, rank-major
        chunks = g.chunk(2 * self.cp, dim=dim)
        return torch.cat([chunks[i] for i in self.natural], dim=dim)


class ContextParallelAttention(_CpSequence):
    """Drop-in ``Attention.core`` for cp > 1: q, k, v [B, heads, 2C, D] -> [B, Hq, 2C, D]."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attend(q, self.gather(k, 2), self.gather(v, 2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """This rank's queries against every key: q [B, Hq, 2C, D], k [B, Hkv, S, D] and
        v [B, Hkv, S, Dv] in natural order -> [B, Hq, 2C, Dv]. ``MLAttention.core`` under cp."""
        # imported here: torch.nn.attention.bias imports Triton, which foldmesh never loads
        # unless a kernel needs it
        from torch.nn.attention.bias import causal_lower_right

        c = q.shape[2] // 2
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


class LatentExchange(_CpSequence):
    """``MLAttention.kv_exchange`` for cp > 1: c [B, 2C, Rkv] (normalised), k_rot
    [B, 1, 2C, Dr] (rotated) -> [B, S, Rkv], [B, 1, S, Dr] in natural order.

    Forward: one all-gather over cp of ``[B, 2C, Rkv + Dr]`` in the compute dtype (the RoPE
    key's: ``kv_a_proj``'s output dtype). Backward: one reduce-scatter over cp of
    ``[B, S, Rkv + Dr]`` in that dtype, and with tp > 1 an all-reduce over tp of c's
    ``[B, 2C, Rkv]`` gradient in ``kv_a_norm``'s output dtype.

    With tp > 1, ``kv_b_proj`` is column-parallel (this rank's heads) and c arrives here
    the same on every tp rank (``_gather_kv_latent``). Each tp rank's heads give only part
    of the gradient of every gathered c, and ``ColwiseParallel`` would all-reduce that
    ``[B, S, Rkv]`` over tp before it reaches this exchange. Instead c goes to ``kv_b_proj``
    as a ``Replicate`` DTensor whose gradient is taken as it comes (``Partial`` over tp),
    reduce-scattered over cp still partial, and summed over tp on this rank's 2C tokens
    only: cp times fewer elements in the tp all-reduce. ``kv_a_norm``, before the exchange,
    then sees the whole gradient, as with cp = 1. The rotated key's gradient stays partial
    over tp too; ``_gather_kv_latent`` reduce-scatters it over tp as with cp = 1.
    """

    def __init__(self, fm: FoldedMesh):
        super().__init__(fm)
        self.tp = fm["tp"] if fm.fold.tp > 1 else None

    def __call__(self, c: torch.Tensor, k_rot: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        latent = c.shape[-1]
        if self.tp is not None:  # forward: nothing; backward: the sum over tp
            c = DTensor.from_local(c, self.tp, [Replicate()], run_check=False).to_local(
                grad_placements=[Partial()])
        # in the RoPE key's dtype, the compute dtype: under autocast kv_a_norm returns the
        # weights' fp32, and kv_b_proj would cast c down anyway (the same values, half the bytes)
        ckv = torch.cat([c.to(k_rot.dtype), k_rot.squeeze(1)], dim=-1)
        ckv = self.gather(ckv, 1)  # [B, S, Rkv + Dr]
        c, k_rot = ckv[..., :latent], ckv[..., latent:].unsqueeze(1)
        if self.tp is not None:
            c = _ReplicateKeepGrad.apply(c, self.tp)
        return c, k_rot


class _ReplicateKeepGrad(torch.autograd.Function):
    """A plain tensor equal on every rank of ``mesh`` -> a ``Replicate`` DTensor whose
    gradient goes back as this rank's local share (``Partial``): unlike ``from_local``, no
    all-reduce in backward; the caller sums it later."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, mesh: DeviceMesh) -> DTensor:
        return DTensor.from_local(t, mesh, [Replicate()], run_check=False)

    @staticmethod
    def backward(ctx, grad: DTensor):
        # column-parallel kv_b_proj hands back Partial; a Replicate gradient is split so
        # that the later sum over tp counts it once
        return grad.redistribute(placements=[Partial()]).to_local(), None
