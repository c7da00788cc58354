"""Top-k MoE router with Megatron-Core's TopKRouter semantics, as a plain single-process module.

Dimension legend: N local tokens, H hidden, E experts, k top-k, G expert groups, B local
sequences, L tokens per local sequence chunk (N = B*L).

The router never imports ``torch.distributed``. The only cross-rank quantities it needs are sums
of integer counts, which it asks of a ``Reductions`` object (identity by default); the
distributed MoE layer installs one that runs the collectives on the right sub-meshes.

Per forward (training mode, grad enabled), at most two reductions run, both on int64 tensors
that carry no gradient:

- ``replica_sum`` over the cp x tp ranks of one data-parallel replica, ``[E + 1 (+ B*E)]``:
  top-k counts, token count (and per-sequence counts), when aux, seq-aux or z-loss is on;
- ``global_sum`` over dp x cp x tp, ``[E + 1]``, when the global aux loss is on.

Distributed, the gate weight also passes through ``Reductions.shared_weight``: identity
forward, and in backward its gradient is all-reduced over the tp ranks (which share the
weight but route different tokens), so it ends complete for the tp group like every other
tensor-parallel weight's.

Every rank of a group must call forward the same number of times (these are collectives).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ._router_losses import attach_loss, balance_loss, balance_scores, z_loss

__all__ = ["Reductions", "Router", "RouterConfig", "RouterOutput"]

SCORE_FUNCTIONS = ("softmax", "sigmoid")
GROUP_SCORES = ("auto", "max", "top2", "topk_share")
ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class RouterConfig:
    """Settings of one router. Validated on construction; errors name the setting and a fix."""

    hidden_size: int
    """H, size of each input token."""
    num_experts: int
    """E, number of routed experts."""
    topk: int
    """k, experts chosen per token (k <= E)."""
    score_function: str = "softmax"
    """"softmax" or "sigmoid" (DeepSeek-V3)."""
    pre_softmax: bool = False
    """softmax only. True: softmax over all E, then top-k of the probabilities (weights not
    renormalised unless ``normalize_topk``). False (Megatron's default, Mixtral): top-k of the
    logits, then softmax over the k chosen logits. Ignored for sigmoid."""
    normalize_topk: bool = False
    """Divide the k weights of each token by their sum (+1e-20) so they sum to 1."""
    scaling_factor: float = 1.0
    """Multiplies the final weights (after ``normalize_topk``)."""
    num_groups: int | None = None
    """G, group-limited routing: experts split into G contiguous groups of E/G. None: off."""
    topk_groups: int | None = None
    """Groups kept per token in group-limited routing (set together with ``num_groups``)."""
    group_score: str = "auto"
    """How a group is scored for group-limited routing, on the selection scores (biased when
    ``expert_bias``): "max" (DeepSeek-V2), "top2" (sum of the 2 best, DeepSeek-V3; the group's
    best alone if a group has 1 expert), "topk_share" (sum of the k // topk_groups best,
    Megatron-Core), "auto" = "top2" for sigmoid with expert bias, else "max"."""
    expert_bias: bool = False
    """Aux-loss-free balancing: an fp32 bias [E] added to the scores for the top-k selection
    only (weights use unbiased scores); updated by ``Router.update_expert_bias``."""
    expert_bias_update_rate: float = 1e-3
    """Step of the bias update ``bias += rate * sign(mean(counts) - counts)``."""
    aux_loss_coeff: float = 0.0
    """Switch/Megatron balancing loss over one replica's micro-batch, 0 = off:
    ``coeff * E / (k * T^2) * sum_e P_e * c_e``; c_e = top-k selections of e and T = tokens,
    both summed over the replica's cp x tp ranks; P_e = this rank's sum over its tokens of the
    unbiased pre-top-k scores (softmax, or sigmoid normalised per token). The per-rank terms
    sum over cp x tp to the replica's loss."""
    seq_aux_loss_coeff: float = 0.0
    """Per-sequence balancing loss (DeepSeek-V2/V3), 0 = off: the aux-loss formula per
    sequence (c, T and P restricted to the sequence, c and T summed over cp x tp), averaged
    over the B sequences. Needs ``num_sequences`` in forward."""
    global_aux_loss_coeff: float = 0.0
    """Global-batch balancing loss, 0 = off: the aux-loss formula with T = this micro-batch's
    tokens summed over dp x cp x tp and c_e = mean over the micro-batches since the last
    ``reset_global_counts`` (this one included) of the dp x cp x tp-summed counts. The per-rank
    terms sum over dp x cp x tp to the global loss."""
    z_loss_coeff: float = 0.0
    """Router z-loss ``coeff * mean_tokens(logsumexp(logits)^2)`` over one replica's
    micro-batch, 0 = off; per rank: local sum divided by the cp x tp-summed T."""
    init_std: float = 0.02
    """Standard deviation of the normal init of the gate weight."""
    router_dtype: str = "fp32"
    """"fp32" or "fp64": dtype of the logits, scores and losses (outputs are fp32)."""
    force_balance: bool = False
    """Benchmarking only: ignore the scores when choosing experts and spread each rank's
    tokens evenly and deterministically (token t's copy j goes to expert (t·k + j) mod E):
    every expert gets N·k/E of a rank's N tokens when E divides N·k, otherwise the counts
    differ by at most one. The weights, losses and gradients are computed as usual at the
    chosen experts. Megatron-Core's published throughput is measured this way
    (``--moe-router-force-load-balancing``); ``foldmesh.moe.apply_force_balance`` sets it."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_experts", "topk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"RouterConfig.{name} must be a positive int, got {v!r}")
        e, k = self.num_experts, self.topk
        if k > e:
            raise ValueError(f"RouterConfig.topk={k} > num_experts={e}: lower topk to <= {e}")
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(
                f"RouterConfig.score_function={self.score_function!r} is unknown; "
                f"use one of {SCORE_FUNCTIONS}"
            )
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(
                f"RouterConfig.router_dtype={self.router_dtype!r} is unknown; use 'fp32' or 'fp64'"
            )
        if self.group_score not in GROUP_SCORES:
            raise ValueError(
                f"RouterConfig.group_score={self.group_score!r} is unknown; "
                f"use one of {GROUP_SCORES}"
            )
        for name in ("aux_loss_coeff", "seq_aux_loss_coeff", "global_aux_loss_coeff",
                     "z_loss_coeff", "expert_bias_update_rate", "init_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"RouterConfig.{name} must be >= 0, got {getattr(self, name)}")
        self._check_groups()

    def _check_groups(self) -> None:
        g, tg, e, k = self.num_groups, self.topk_groups, self.num_experts, self.topk
        if (g is None) != (tg is None):
            raise ValueError(
                f"RouterConfig.num_groups={g} and topk_groups={tg}: set both for group-limited "
                "routing, or neither"
            )
        if g is None:
            return
        if g <= 0 or e % g:
            raise ValueError(
                f"RouterConfig.num_groups={g} must divide num_experts={e}; pick a divisor of {e}"
            )
        if not 0 < tg <= g:
            raise ValueError(
                f"RouterConfig.topk_groups={tg} must be in 1..num_groups={g}; lower topk_groups"
            )
        if k > tg * (e // g):
            raise ValueError(
                f"RouterConfig.topk={k} > topk_groups*experts_per_group={tg}*{e // g}: "
                "the kept groups hold too few experts; raise topk_groups or lower topk"
            )
        if self.resolved_group_score == "topk_share" and k < tg:
            raise ValueError(
                f"RouterConfig.group_score='topk_share' needs topk={k} >= topk_groups={tg} "
                "(it sums the k // topk_groups best scores of a group); use group_score='max'"
            )

    @property
    def resolved_group_score(self) -> str:
        """``group_score`` with "auto" resolved."""
        if self.group_score != "auto":
            return self.group_score
        return "top2" if self.score_function == "sigmoid" and self.expert_bias else "max"

    @property
    def dtype(self) -> torch.dtype:
        return ROUTER_DTYPES[self.router_dtype]


class RouterOutput(NamedTuple):
    """What ``Router.forward`` returns.

    probs: [N, k] fp32, routing weights, differentiable (the balancing losses ride on them).
    indices: [N, k] int64, chosen experts, ordered by decreasing selection score.
    scores: [N, E] fp32, full unbiased scores before top-k (softmax over E or sigmoid).
    counts: [E] int64, this rank's top-k selections per expert (sums to N*k).
    """

    probs: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor
    counts: torch.Tensor


def _no_autocast(device_type: str):
    """Autocast off for ``device_type`` (a no-op where autocast does not exist: meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Reductions:
    """Sums of count tensors over groups of ranks; this base class is the single-process identity.

    ``replica_sum`` sums over the cp x tp ranks holding one data-parallel replica's tokens;
    ``global_sum`` over all dp x cp x tp ranks of a pipeline stage. Inputs are int64 tensors
    that need no gradient; an implementation may reduce in place and return its input.
    """

    def replica_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def global_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def shared_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The gate weight as this rank's tokens use it. Distributed: identity forward, and
        the gradient summed over the ranks that share the weight and route different tokens
        of one tensor-parallel group (so it ends like any tensor-parallel weight's)."""
        return w


def recomputing() -> bool:
    """Whether this forward runs inside backward: the replay of a checkpointed forward."""
    return torch._C._current_graph_task_id() != -1


def expert_counts(indices: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Histogram of ``indices`` (any shape, int64) into [num_bins] int64, on the device."""
    flat = indices.reshape(-1)
    out = torch.zeros(num_bins, dtype=torch.int64, device=indices.device)
    return out.scatter_add_(0, flat, torch.ones_like(flat))


def balanced_indices(sel: torch.Tensor, topk: int) -> torch.Tensor:
    """[N, k] int64: token t's copy j to expert (t·k + j) mod E, whatever ``sel`` [N, E]
    says: k distinct experts per token (k <= E), every expert N·k/E times when E | N·k."""
    n, e = sel.shape
    slots = torch.arange(n * topk, device=sel.device, dtype=torch.int64).view(n, topk)
    return slots % e


def _select(sel: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """Top-k indices [N, k] of the selection scores ``sel`` [N, E], group-limited if set."""
    if cfg.num_groups is None:
        return sel.topk(cfg.topk, dim=-1).indices
    n, e, g = sel.shape[0], sel.shape[1], cfg.num_groups
    grouped = sel.reshape(n, g, e // g)
    best = {"max": 1, "top2": min(2, e // g), "topk_share": cfg.topk // cfg.topk_groups}
    group_scores = grouped.topk(best[cfg.resolved_group_score], dim=-1).values.sum(-1)  # [N, G]
    kept = group_scores.topk(cfg.topk_groups, dim=-1).indices
    keep = torch.zeros(n, g, dtype=torch.bool, device=sel.device).scatter_(1, kept, True)
    masked = sel.masked_fill(~keep.repeat_interleave(e // g, dim=1), float("-inf"))
    return masked.topk(cfg.topk, dim=-1).indices


def route(
    logits: torch.Tensor, cfg: RouterConfig, expert_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, top-k selection and weights from the logits.

    Args:
        logits: [N, E], router dtype.
        cfg: the router's settings.
        expert_bias: [E] fp32 or None, added to the selection scores only.

    Returns:
        weights [N, k] (router dtype, differentiable), indices [N, k] int64, scores [N, E]
        (router dtype: softmax over E, or sigmoid).
    """
    if cfg.score_function == "softmax":
        scores = torch.softmax(logits, dim=-1)
        # Mixtral (pre_softmax=False) selects on the logits and softmaxes the k chosen ones.
        base = scores if cfg.pre_softmax else logits
    else:
        scores = torch.sigmoid(logits)
        base = scores
    sel = base.detach()
    if expert_bias is not None:
        sel = sel + expert_bias.to(sel.dtype)
    indices = balanced_indices(sel, cfg.topk) if cfg.force_balance else _select(sel, cfg)
    weights = base.gather(1, indices)
    if cfg.score_function == "softmax" and not cfg.pre_softmax:
        weights = torch.softmax(weights, dim=-1)
    if cfg.normalize_topk:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if cfg.scaling_factor != 1.0:
        weights = weights * cfg.scaling_factor
    return weights, indices, scores


class Router(nn.Module):
    """Linear gate [E, H] + top-k routing + load-balancing losses attached to the weights.

    Attributes besides the config:
        weight: [E, H] parameter (dtype from the ``dtype`` argument, fp32 by default).
        expert_bias: [E] fp32 buffer (persistent, checkpointed) or None. Keep it fp32:
            ``module.to(bf16)`` would cast it and lose the small bias updates.
        local_counts: [E] int64 buffer or None: top-k counts of this rank summed over the
            training forwards since the last ``update_expert_bias``.
        global_counts_sum / global_microbatches: [E] / [] int64 buffers or None: global top-k
            counts summed over the micro-batches since the last ``reset_global_counts``.
        reductions: ``Reductions`` used when forward gets none (identity until a parallelize
            function installs one).
        loss_scale: gradient given to the attached losses (see ``forward``).
        last_counts: [E] int64, this rank's top-k selections of the last forward (metrics).
        last_losses: dict of detached per-rank loss terms of the last forward, keys among
            "aux_loss", "seq_aux_loss", "global_aux_loss", "z_loss". The replica's value of a
            loss is the ``replica_sum`` of its terms; for "global_aux_loss" the global-batch
            value is their ``global_sum`` (the replica_sum is the replica's share of it).

    Counters only move in training mode with grad enabled, and not while backward recomputes
    a checkpointed forward (``recomputing``): an eval pass and the replay of non-reentrant
    activation checkpointing (what ``foldmesh.parallelize`` applies) do not count, so every
    micro-batch counts once and the replay sees the same global-aux average as the first
    pass. (Reentrant checkpointing, whose first pass runs without grad, would not count.)
    """

    def __init__(
        self,
        config: RouterConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        e = config.num_experts
        self.weight = nn.Parameter(torch.empty(e, config.hidden_size, device=device, dtype=dtype))

        def buffer(shape, dt):
            return torch.zeros(shape, dtype=dt, device=device)

        bias = config.expert_bias
        gl = config.global_aux_loss_coeff > 0
        self.register_buffer("expert_bias", buffer(e, torch.float32) if bias else None)
        self.register_buffer("local_counts", buffer(e, torch.int64) if bias else None, False)
        self.register_buffer("global_counts_sum", buffer(e, torch.int64) if gl else None, False)
        self.register_buffer("global_microbatches", buffer((), torch.int64) if gl else None, False)
        self.reductions: Reductions = Reductions()
        self.loss_scale: float = 1.0
        self.last_losses: dict[str, torch.Tensor] = {}
        self.last_counts: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Init the gate weight ~ N(0, init_std) and zero every buffer (bias and counters).

        Call after ``to_empty()`` when the model was built on the meta device.
        """
        with torch.no_grad():
            nn.init.normal_(self.weight, mean=0.0, std=self.config.init_std)
            for b in self.buffers(recurse=False):
                b.zero_()

    def extra_repr(self) -> str:
        c = self.config
        return f"E={c.num_experts}, H={c.hidden_size}, k={c.topk}, score={c.score_function}"

    def forward(
        self,
        x: torch.Tensor,
        num_sequences: int | None = None,
        reductions: Reductions | None = None,
    ) -> RouterOutput:
        """Route the local tokens.

        Args:
            x: [N, H], any float dtype; cast to the router dtype for the gate matmul.
            num_sequences: B, needed by the seq-aux loss. x holds B sequence chunks of
                L = N/B tokens each, sequence-major (token i belongs to sequence i // L).
            reductions: overrides ``self.reductions`` for this call.

        Returns:
            ``RouterOutput`` (probs [N, k] fp32, indices [N, k] int64, scores [N, E] fp32,
            counts [E] int64).

        In training mode with grad enabled, the enabled losses are computed as per-rank terms
        and attached to ``probs``: in backward each loss gets gradient ``self.loss_scale``
        (read at forward time). Set ``loss_scale = 1 / num_microbatches`` when the training
        loss of each micro-batch is divided by their number (gradient accumulation; pipeline
        micro-batches go through the same path), times the loss scale of a grad scaler if one
        is used. No host synchronisation happens here.
        """
        cfg = self.config
        if x.dim() != 2 or x.shape[1] != cfg.hidden_size:
            raise ValueError(
                f"Router input must be [N, hidden_size={cfg.hidden_size}], got "
                f"{tuple(x.shape)}; flatten batch and sequence dims first"
            )
        dt = cfg.dtype
        red = reductions if reductions is not None else self.reductions
        # autocast (the trainer's bf16 replication) would run this matmul in bf16 whatever
        # the casts say: the router's precision is its own setting, so autocast is off here
        with _no_autocast(x.device.type):
            logits = x.to(dt) @ red.shared_weight(self.weight).to(dt).t()  # [N, E]
        weights, indices, scores = route(logits, cfg, self.expert_bias)
        counts = expert_counts(indices, cfg.num_experts)  # [E]
        self.last_counts = counts
        self.last_losses = {}
        if self.training and torch.is_grad_enabled():
            if self.local_counts is not None and not recomputing():
                self.local_counts.add_(counts)
            total = self._losses(logits, indices, counts, num_sequences, red)
            if total is not None:
                weights = attach_loss(weights, total, self.loss_scale)
        return RouterOutput(weights.float(), indices, scores.float(), counts)

    def _losses(self, logits, indices, counts, num_sequences, red) -> torch.Tensor | None:
        """Per-rank loss terms; fills ``last_losses`` and returns their sum (or None)."""
        cfg = self.config
        n, e = logits.shape
        seq_on = cfg.seq_aux_loss_coeff > 0
        replica_on = seq_on or cfg.aux_loss_coeff > 0 or cfg.z_loss_coeff > 0
        global_on = cfg.global_aux_loss_coeff > 0
        if not (replica_on or global_on):
            return None
        ntok = counts.new_full((1,), n)
        p = None  # z-loss alone needs no balance scores
        if seq_on or global_on or cfg.aux_loss_coeff > 0:
            p = balance_scores(logits, cfg.score_function)  # [N, E]
        terms: dict[str, torch.Tensor] = {}
        if replica_on:
            parts = [counts, ntok]
            if seq_on:
                b = self._check_sequences(n, num_sequences)
                seq = torch.arange(b, device=indices.device).repeat_interleave(n // b)  # [N]
                flat = (seq[:, None] * e + indices).reshape(-1)
                parts.append(expert_counts(flat, b * e))  # [B*E]
            stats = red.replica_sum(torch.cat(parts))
            c, t = stats[:e], stats[e:e + 1]
            if cfg.aux_loss_coeff > 0:
                terms["aux_loss"] = balance_loss(
                    p.sum(0, keepdim=True), c[None], t, cfg.topk, cfg.aux_loss_coeff
                )
            if seq_on:
                # Each rank holds L_r tokens of every sequence, so T_b = T / B exactly.
                c_seq = stats[e + 1:].view(b, e)
                t_seq = (t // b).expand(b)
                p_seq = p.reshape(b, n // b, e).sum(1)
                terms["seq_aux_loss"] = balance_loss(
                    p_seq, c_seq, t_seq, cfg.topk, cfg.seq_aux_loss_coeff
                )
            if cfg.z_loss_coeff > 0:
                terms["z_loss"] = z_loss(logits, t[0], cfg.z_loss_coeff)
        if global_on:
            stats = red.global_sum(torch.cat([counts, ntok]))
            if not recomputing():
                with torch.no_grad():
                    self.global_counts_sum.add_(stats[:e])
                    self.global_microbatches.add_(1)
            # c_e: mean global count per micro-batch since the last reset, this one included;
            # T: this micro-batch's global token count.
            avg = self.global_counts_sum.to(logits.dtype) / self.global_microbatches
            terms["global_aux_loss"] = balance_loss(
                p.sum(0, keepdim=True), avg[None], stats[e:], cfg.topk, cfg.global_aux_loss_coeff
            )
        self.last_losses = {name: v.detach() for name, v in terms.items()}
        return sum(terms.values())

    def _check_sequences(self, n: int, num_sequences: int | None) -> int:
        if num_sequences is None or num_sequences <= 0:
            raise ValueError(
                "RouterConfig.seq_aux_loss_coeff > 0 needs forward(x, num_sequences=B) with "
                f"B >= 1, got {num_sequences!r}; pass B or set seq_aux_loss_coeff=0"
            )
        if n % num_sequences:
            raise ValueError(
                f"Router input has N={n} tokens, not divisible by num_sequences="
                f"{num_sequences}; x must hold B chunks of equal length L = N/B"
            )
        return num_sequences

    @torch.no_grad()
    def update_expert_bias(
        self,
        counts_global: torch.Tensor | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Aux-loss-free bias step: ``bias += rate * sign(mean(c) - c)``; call once per
        optimizer step. Resets ``local_counts``.

        Args:
            counts_global: [E], c already summed over dp x cp x tp (and the micro-batches).
                None: use ``local_counts`` reduced by ``reduce``, or by
                ``self.reductions.global_sum`` when ``reduce`` is None.
            reduce: applied to the counts before the update (to a copy) when given.
        """
        if self.expert_bias is None:
            raise ValueError(
                "update_expert_bias needs RouterConfig.expert_bias=True; enable it or stop "
                "calling update_expert_bias"
            )
        c = counts_global
        if c is None:
            c = self.local_counts.clone()
            reduce = reduce if reduce is not None else self.reductions.global_sum
        elif reduce is not None:
            c = c.clone()
        if reduce is not None:
            c = reduce(c)
        c = c.to(torch.float64)
        step = torch.sign(c.mean() - c) * self.config.expert_bias_update_rate
        self.expert_bias.add_(step.to(self.expert_bias.dtype))
        self.local_counts.zero_()

    @torch.no_grad()
    def reset_global_counts(self) -> None:
        """Start a new running average of global counts; the trainer calls it after each
        optimizer step when the global aux loss is on (no-op otherwise)."""
        if self.global_counts_sum is not None:
            self.global_counts_sum.zero_()
            self.global_microbatches.zero_()
