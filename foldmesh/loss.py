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
    if isinstance(logits, DTensor):
        if fm is None:
            raise ValueError("cross_entropy of DTensor logits needs the folded mesh fm")
        return local_cross_entropy(logits.to_local(grad_placements=logits.placements),
                                   local_tokens(labels, fm), fm, reduction)
    return local_cross_entropy(logits, labels, None, reduction)


def local_cross_entropy(logits: torch.Tensor, target: torch.Tensor, fm: FoldedMesh | None,
                        reduction: str = "mean") -> torch.Tensor:
    """``cross_entropy`` of this rank's own block: ``logits`` [b, S/cp, V/tp] (plain, the
    rank's vocabulary slice when ``fm`` is given, else the whole vocabulary) and ``target``
    [b, S/cp] int64, the rank's labels (global ids). A pipeline's last stage computes its loss
    with this."""
    group, start = None, 0
    if fm is not None and fm.fold.tp > 1:
        group = fm["tp"].get_group()
        start = fm.coordinate("tp") * logits.shape[-1]
    shape = target.shape
    loss = _VocabParallelCE.apply(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                  start, group)
    if reduction == "none":
        return loss.view(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != IGNORE_INDEX).sum().clamp(min=1)
