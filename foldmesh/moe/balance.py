"""Force-balanced routing for benchmarks: ``apply_force_balance``.

Megatron-Core and Megatron-Bridge publish their throughput with forced load balancing: the
routers ignore their scores and spread the tokens evenly over the experts, so that a
benchmark measures the layout and the kernels rather than how well a router has learned to
balance (up to +25% against a learned router). foldmesh does the same, deterministically
(``RouterConfig.force_balance``): with it every expert of every layer gets exactly N·k/E of
each rank's N tokens (E dividing N·k). A model trained this way learns nothing useful about
routing; use it to benchmark only.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .router import Router

__all__ = ["apply_force_balance"]


def apply_force_balance(model: nn.Module, enabled: bool = True) -> int:
    """Turn force-balanced routing on (or off) for every ``Router`` in ``model``, in place.

    Returns the number of routers changed (0 for a model without MoE layers)."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for router in routers:
        router.config = dataclasses.replace(router.config, force_balance=enabled)
    return len(routers)
