"""Compare sharded results with single-process references."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .._init import local_block

# Default tolerances per dtype: fp32 results differ from a single-process reference only by
# reduction order; bf16 keeps 8 mantissa bits.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
}


def full(t: torch.Tensor) -> torch.Tensor:
    """The global value of a DTensor (gathered on every rank), or a plain tensor unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_close_to_reference(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    name: str = "tensor",
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Assert a (possibly sharded) result equals a single-process reference.

    ``actual`` may be a DTensor (compared through ``full_tensor()``, so every rank must call
    this) or a plain tensor. Tolerances default to ``TOLERANCES`` for the reference's dtype.
    The message names ``name`` and, for DTensors, the mesh and placements.
    """
    got = full(actual).detach()
    tol = dict(TOLERANCES.get(expected.dtype, TOLERANCES[torch.float32]))
    if rtol is not None:
        tol["rtol"] = rtol
    if atol is not None:
        tol["atol"] = atol
    where = ""
    if isinstance(actual, DTensor):
        where = f" (DTensor on {actual.device_mesh} with {actual.placements})"
    torch.testing.assert_close(
        got.to(expected.dtype).cpu(),
        expected.detach().cpu(),
        **tol,
        msg=lambda m: f"{name}{where} differs from the single-process reference:\n{m}",
    )


@torch.no_grad()
def load_reference(model: nn.Module, ref: nn.Module) -> None:
    """Copy the single-process reference ``ref``'s weights into the parallel ``model`` (or a
    pipeline stage of it) by parameter name, each rank its own block of every DTensor;
    activation-checkpoint wrappers' levels are ignored in the names."""
    full = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        src = full[name.replace("_checkpoint_wrapped_module.", "")]
        (p.to_local() if isinstance(p, DTensor) else p).copy_(local_block(p, src))
