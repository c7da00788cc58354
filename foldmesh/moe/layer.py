"""The MoE layer as a plain module: router, token dispatcher, routed experts, shared expert.

Dimension legend: B sequences, L tokens per sequence (chunk), N = B*L tokens, H hidden,
E experts, k top-k, C per-expert capacity.

Single-process by default. ``foldmesh.moe.apply_moe_parallel`` swaps in a distributed
dispatcher (all-to-all or all-gather over the MoE view) and turns the weights into DTensors;
the layer itself never touches a process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import capacity_for, permute, unpermute
from .experts import GroupedExperts, SharedExpert
from .router import Router, RouterConfig

DROP_POLICIES = ("probs", "position")


@dataclass(frozen=True)
class MoEConfig:
    """Settings of one MoE layer (the router has its own ``RouterConfig``)."""

    ffn_size: int
    """F, FFN size of each routed expert (split over etp when parallel)."""
    capacity_factor: float | None = None
    """None: dropless. Otherwise each rank keeps at most ``ceil(N*k/E * capacity_factor)``
    copies per expert of its own N tokens (sub-sequence dropping)."""
    drop_policy: str = "probs"
    """With a capacity: "probs" keeps each expert's most probable copies, "position" the
    earliest tokens."""
    pad_to_capacity: bool = False
    """Pad every expert to exactly its capacity: static shapes, no host synchronisation in
    the all-to-all dispatcher, same numbers as without padding."""
    shared_ffn_size: int = 0
    """FFN size of the shared expert; 0 = no shared expert."""
    shared_gate: bool = False
    """Scale the shared expert's output by a sigmoid gate (Qwen2-MoE)."""
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"MoEConfig.capacity_factor must be > 0 or None (dropless), "
                             f"got {self.capacity_factor}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"MoEConfig.drop_policy must be one of {DROP_POLICIES}, "
                             f"got {self.drop_policy!r}")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError("MoEConfig.pad_to_capacity needs a capacity_factor")


def token_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the MoE token path for input ``x``: autocast's when autocast is on for
    x's device (the trainer's bf16 replication keeps an fp32 residual stream), else x's own.

    Autocast casts only the ops on its lists; the permute, the dispatch collectives, the
    Triton grouped GEMMs and the unpermute are not on them, so the layer casts the tokens
    once itself, and everything after runs in that dtype (docs/kernels.md, "Autocast")."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class LocalDispatcher:
    """Single-process dispatch: permute, experts, unpermute."""

    def __call__(self, moe: MoE, tokens: torch.Tensor, probs: torch.Tensor,
                 indices: torch.Tensor) -> torch.Tensor:
        perm = permute(tokens, indices, probs, moe.num_experts, **moe.capacity_args(tokens))
        y = moe.experts(perm.tokens, perm.counts)
        return unpermute(y, perm, probs)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts plus an optional shared expert.

    ``forward(x)``: x [B, L, H] or [N, H] -> same shape, in ``token_dtype(x)``: x's dtype, or
    autocast's (bf16) when autocast is on, as a linear layer's output would be. The routing
    weights multiply the expert outputs when the k copies of a token are combined.
    ``last_dropped`` ([] int64) counts the copies of this rank's tokens the capacity dropped
    in the last forward.
    """

    def __init__(self, router: RouterConfig, config: MoEConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.num_experts = router.num_experts
        self.topk = router.topk
        self.router = Router(router, device=device, dtype=dtype)
        self.experts = GroupedExperts(router.num_experts, router.hidden_size, config.ffn_size,
                                      config.init_std, device=device, dtype=dtype)
        self.shared_expert = None
        if config.shared_ffn_size:
            self.shared_expert = SharedExpert(router.hidden_size, config.shared_ffn_size,
                                              config.shared_gate, config.init_std,
                                              device=device, dtype=dtype)
        self.dispatcher = LocalDispatcher()

    def capacity_args(self, tokens: torch.Tensor) -> dict:
        """permute's capacity arguments for this rank's ``tokens`` (its own N)."""
        c = self.config
        if c.capacity_factor is None:
            return {}
        cap = capacity_for(tokens.shape[0], self.num_experts, self.topk, c.capacity_factor)
        return dict(capacity=cap, drop_policy=c.drop_policy, pad_to_capacity=c.pad_to_capacity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        num_sequences = shape[0] if x.dim() == 3 else None
        tokens = x.reshape(-1, shape[-1])
        route = self.router(tokens, num_sequences=num_sequences)
        cap = self.capacity_args(tokens)
        # copies over capacity, for metrics: each expert keeps min(count, C) of this rank's
        self.last_dropped = ((route.counts - cap["capacity"]).clamp(min=0).sum() if cap
                             else route.counts.new_zeros(()))
        # The router read the tokens as they came (in its own dtype); the routed copies, the
        # collectives that carry them and the experts run in the compute dtype. The combine
        # weights keep at least the router's fp32 (fp64 for a float64 model, so that their
        # gradient is not rounded to fp32): unpermute accumulates in fp32 and rounds once.
        routed = tokens.to(token_dtype(tokens))
        probs = route.probs.to(torch.promote_types(route.probs.dtype, tokens.dtype))
        out = self.dispatcher(self, routed, probs, route.indices)
        if self.shared_expert is not None:
            out = out + self.shared_expert(routed)
        return out.reshape(shape)
