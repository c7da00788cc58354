"""Autocast's rule for foldmesh's matrix products.

``torch.autocast`` casts the inputs of the ops on its lists (``torch.mm``, ``F.linear``, ...)
and nothing else: a Triton kernel or an autograd Function launched from Python is invisible
to it. ``grouped_gemm`` and ``swiglu_experts`` are matrix products, so they apply the rule of
autocast's lower-precision list themselves: under autocast for the inputs' device, float32
inputs are cast to autocast's dtype (float64 is left alone, as autocast leaves it), and the
product runs and returns in that dtype. The casts are differentiable: fp32 parameters get
fp32 gradients. Data movement (permute, unpermute, sort_chunks) and the activation keep
their input's dtype, as autocast's fall-through ops do.
"""

from __future__ import annotations

import torch

__all__ = ["autocast_inputs"]


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` as autocast would hand them to a matrix product on their device."""
    device = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.dtype == torch.float32 else t for t in tensors)
