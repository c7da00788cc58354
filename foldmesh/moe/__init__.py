"""MoE layer: router, token dispatch over the folded MoE view, experts, shared expert."""

from .balance import apply_force_balance
from .experts import GroupedExperts, SharedExpert
from .layer import MoE, MoEConfig
from .parallel import apply_moe_parallel
from .router import Reductions, Router, RouterConfig, RouterOutput

__all__ = [
    "GroupedExperts",
    "MoE",
    "MoEConfig",
    "Reductions",
    "Router",
    "RouterConfig",
    "RouterOutput",
    "SharedExpert",
    "apply_force_balance",
    "apply_moe_parallel",
]
