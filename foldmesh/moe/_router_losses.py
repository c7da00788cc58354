"""Load-balancing losses of the MoE router, and the autograd function that attaches them.

Dimension legend: N local tokens, E experts, k top-k, B local sequences, L tokens per local
sequence chunk (N = B*L).

Sharding rule shared by every loss here: a loss over a set of tokens spread over several ranks
is written as a sum of per-rank terms. The non-differentiable statistics (top-k counts c, token
counts T) are summed over the ranks first, so every rank sees the same c and T; the
differentiable part (the score sums P, the z-loss sum) stays local. The sum of the per-rank
terms is then exactly the loss of the unsharded tokens, in value and in gradient, whatever the
tp/cp/ep/etp split (tests/moe/test_router.py checks this).

Nothing here touches a process group: the counts arrive already reduced.
"""

from __future__ import annotations

import torch


class _AttachLoss(torch.autograd.Function):
    """Identity on ``weights``; in backward, sends ``scale`` as the gradient of ``loss``.

    This is Megatron-Core's ``MoEAuxLossAutoScaler``: the auxiliary losses reach the router's
    parameters through the routing weights' backward, so the forward output is unchanged and
    the user never adds them to the training loss.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.loss_meta = (loss.dtype, loss.device)
        return weights

    @staticmethod
    def backward(ctx, grad_weights: torch.Tensor):
        dtype, device = ctx.loss_meta
        return grad_weights, torch.full((), ctx.scale, dtype=dtype, device=device), None


def attach_loss(weights: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ``weights`` unchanged, with ``loss`` (a scalar) wired into its backward.

    The gradient of ``loss`` is ``scale`` and only flows when ``weights`` receives a gradient,
    i.e. when the routing weights are used in the training loss (they always are in an MoE
    layer: they scale the expert outputs).
    """
    return _AttachLoss.apply(weights, loss, scale)


def balance_scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Per-token expert probabilities used by the balancing losses (Megatron's convention).

    Args:
        logits: [N, E], router dtype.
        score_function: "softmax" (softmax over E) or "sigmoid" (sigmoid scores divided by
            their per-token sum, so that each row sums to 1 like a softmax).

    Returns:
        [N, E], dtype of ``logits``, unbiased and taken before top-k, differentiable.
    """
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    s = torch.sigmoid(logits)
    return s / (s.sum(dim=-1, keepdim=True) + 1e-20)


def balance_loss(
    score_sum: torch.Tensor,
    counts: torch.Tensor,
    num_tokens: torch.Tensor,
    topk: int,
    coeff: float,
) -> torch.Tensor:
    """Per-rank term of the Switch load-balancing loss, averaged over independent token sets.

    For each token set s (one replica's micro-batch, or one sequence):
    ``coeff * E / (k * T_s^2) * sum_e P_{s,e} * c_{s,e}``, then the mean over s.

    Args:
        score_sum: [S, E], router dtype, differentiable. P: this rank's sum of
            ``balance_scores`` over its tokens of each set.
        counts: [S, E], any dtype, no grad. c: top-k selections of each expert in each set,
            already summed over every rank that holds tokens of the set.
        num_tokens: [S], any dtype, no grad. T: tokens per set, summed over the same ranks.
        topk: k.
        coeff: loss coefficient.

    Returns:
        Scalar, dtype of ``score_sum``. A set with no tokens anywhere contributes 0.
    """
    num_experts = score_sum.shape[-1]
    t = num_tokens.to(score_sum.dtype).clamp_min(1.0)  # an empty set has P = c = 0: keep it 0
    per_set = (score_sum * counts.to(score_sum.dtype)).sum(dim=-1) / (t * t)
    return per_set.mean() * (coeff * num_experts / topk)


def z_loss(logits: torch.Tensor, num_tokens: torch.Tensor, coeff: float) -> torch.Tensor:
    """Per-rank term of the router z-loss ``coeff * mean_tokens(logsumexp(logits)^2)``.

    Args:
        logits: [N, E], router dtype, this rank's tokens.
        num_tokens: scalar, no grad. T: tokens of the replica, summed over its cp x tp ranks.
            Dividing the local sum by T (not by N) makes the per-rank terms add up to the
            replica mean even when ranks hold different numbers of tokens.
        coeff: loss coefficient.

    Returns:
        Scalar, dtype of ``logits``.
    """
    lse = torch.logsumexp(logits, dim=-1)
    return (lse * lse).sum() * coeff / num_tokens.to(logits.dtype).clamp_min(1.0)
