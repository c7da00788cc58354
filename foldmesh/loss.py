"""Cross-entropy on the parallel model's logits, vocabulary split over tp.

Dimension legend: n = b·S/cp tokens of this rank's block, V vocabulary, Vt = V/tp the rank's
slice of it.

The logits stay vocabulary-parallel: per token, the max and the sum of exponentials are
all-reduced over tp (2 all-reduces of [n] floats) and the target's logit is picked on the
rank that owns it (1 more), instead of all-gathering [n, V] logits. The backward is local:
``softmax - onehot`` on the rank's slice (Megatron-Core's vocab-parallel cross-entropy).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ._mesh import FoldedMesh
from ._sequence import local_tokens

IGNORE_INDEX = -100


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        """logits [n, Vt] float, target [n] int64 (global ids; IGNORE_INDEX skipped) ->
        per-token loss [n] (at least fp32), 0 where ignored."""
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        m = z.max(dim=-1).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(z - m[:, None])
        s = e.sum(dim=-1)
        local = target - vocab_start
        mine = (local >= 0) & (local < z.shape[1])
        idx = torch.where(mine, local, 0)
        picked = torch.where(mine, z.gather(1, idx[:, None]).squeeze(1), 0.0)
        if group is not None:
            both = torch.stack([s, picked])  # one all-reduce for both sums
            dist.all_reduce(both, group=group)
            s, picked = both[0], both[1]
        valid = target != IGNORE_INDEX
        loss = torch.where(valid, torch.log(s) + m - picked, 0.0)
        ctx.save_for_backward(e, s, idx, mine, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        e, s, idx, mine, valid = ctx.saved_tensors
        g = e / s[:, None]  # this rank's slice of the softmax
        g[torch.arange(g.shape[0], device=g.device), idx] -= mine.to(g.dtype)
        g = g * (grad * valid)[:, None]
        return g.to(ctx.logits_dtype), None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, fm: FoldedMesh | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy of this rank's block.

    Args:
        logits: the parallel model's output, a DTensor ``[B, S, V]`` on ``fm.attn_stage``
            (placements ``foldmesh.parallelize.LOGITS``), or plain ``[..., V]`` logits with
            ``fm=None`` (single process).
        labels: ``[B, S]`` int64 target ids, global (the same on every rank) or a DTensor from
            ``foldmesh.distribute_tokens``; ``IGNORE_INDEX`` (-100) marks tokens to skip.
        fm: the folded mesh (None for plain logits).
        reduction: "mean" over this rank's non-ignored tokens (the loss each rank
            backpropagates, see ``foldmesh.data_parallel``), "sum", or "none" ([b, S/cp]).

    Returns:
        fp32; the same value on the tp ranks of a group. The global mean is the average of
        the "mean" values over ``fm["dp_cp"]`` when every rank has as many valid tokens.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    group, start = None, 0
    if isinstance(logits, DTensor):
        if fm is None:
            raise ValueError("cross_entropy of DTensor logits needs the folded mesh fm")
        target = local_tokens(labels, fm)
        local = logits.to_local(grad_placements=logits.placements)
        if fm.fold.tp > 1:
            group = fm["tp"].get_group()
            start = fm.coordinate("tp") * local.shape[-1]
    else:
        target, local = labels, logits
    shape = target.shape
    loss = _VocabParallelCE.apply(local.reshape(-1, local.shape[-1]), target.reshape(-1),
                                  start, group)
    if reduction == "none":
        return loss.view(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != IGNORE_INDEX).sum().clamp(min=1)
