"""Meta-device stand-ins for the dry run: what lets foldmesh's real code run on meta tensors.

Each stand-in has the shapes and the saved tensors of the kernel it replaces, and is active
only inside ``_meta_kernels()`` / ``_meta_fsdp()`` (undone on exit):

* the grouped GEMM, SwiGLU and unpermute (the torch references read group sizes with
  ``.tolist()``, which meta tensors cannot answer);
* FSDP2 on the meta device (it refuses meta parameters and allocates its communication
  buffers on the mesh's device);
* ``_MetaMode``: CUDA autocast's casts (autocast does not act on meta) and SDPA routed to
  flash attention's meta kernel (the math path would save a full score matrix).
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _MetaGroupedGemm(torch.autograd.Function):
    """Shapes and saved tensors of the Triton grouped GEMM (x, w, offsets)."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return x.new_empty(x.shape[0], w.shape[2])

    @staticmethod
    def backward(ctx, dy):
        x, w, _ = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(w), None


class _MetaSwiGLU(torch.autograd.Function):
    """Shapes and saved tensors of the Triton SwiGLU (h and the row weights)."""

    @staticmethod
    def forward(ctx, h, probs):
        ctx.save_for_backward(h, probs)
        return h.new_empty(h.shape[0], h.shape[1] // 2)

    @staticmethod
    def backward(ctx, da):
        h, probs = ctx.saved_tensors
        return torch.empty_like(h), None if probs is None else torch.empty_like(probs)


class _MetaUnpermute(torch.autograd.Function):
    """Shapes and saved tensors of the Triton unpermute (probs, maps, y if probs need a
    gradient)."""

    @staticmethod
    def forward(ctx, y, probs, row_map, row_copy):
        want_dprobs = probs is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(probs, row_map, row_copy, y if want_dprobs else None)
        ctx.y_shape = y.shape
        return y.new_empty(row_map.shape[0], y.shape[1])

    @staticmethod
    def backward(ctx, grad_out):
        probs = ctx.saved_tensors[0]
        grad_probs = None if probs is None else torch.empty_like(probs)
        return grad_out.new_empty(ctx.y_shape), grad_probs, None, None


def _on_meta(reference, stand_in):
    def op(x, *args, **kwargs):
        on_meta = x.device.type == "meta"
        return (stand_in if on_meta else reference)(x, *args, **kwargs)

    return op


@contextlib.contextmanager
def _meta_kernels():
    from ..kernels import _experts, _ops
    from ..kernels._backend import ENV_VAR

    # the stand-ins replace the torch path: a forced Triton backend would launch kernels
    with mock.patch.dict(os.environ, {ENV_VAR: "torch"}), _patched(
        (_ops, "grouped_gemm_ref", _on_meta(_ops.grouped_gemm_ref, _MetaGroupedGemm.apply)),
        (_ops, "unpermute_ref", _on_meta(_ops.unpermute_ref, lambda y, perm, probs=None:
                                         _MetaUnpermute.apply(y, probs, perm.row_map,
                                                              perm.row_copy))),
        (_experts, "swiglu_ref", _on_meta(_experts.swiglu_ref, lambda h, probs=None:
                                          _MetaSwiGLU.apply(h, probs))),
    ):
        yield


@contextlib.contextmanager
def _patched(*changes: tuple[object, str, object]):
    """Set attributes for the duration of the block and restore them after."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def _meta_fsdp():
    """FSDP2 on the meta device: its device (all-gather and reduce-scatter buffers) is meta,
    whose streams and events are the CPU's no-ops, and meta parameters are allowed."""
    from torch.distributed import device_mesh
    from torch.distributed.fsdp._fully_shard import (
        _fsdp_collectives,
        _fsdp_param_group,
        _fsdp_state,
        _fully_shard,
    )

    handle = device_mesh._get_device_handle

    def device_handle(device_type: str = "cuda"):
        return torch.cpu if device_type == "meta" else handle(device_type)

    changes = [(_fully_shard, "_get_device_from_mesh", lambda mesh: torch.device("meta")),
               (_fsdp_param_group.FSDPParamGroup, "_validate_no_meta_params", lambda self: None)]
    changes += [(m, "_get_device_handle", device_handle)
                for m in (_fsdp_collectives, _fsdp_param_group, _fsdp_state)]
    with _patched(*changes):
        yield


class _MetaMode(TorchFunctionMode):
    """Attention on meta tensors as flash attention; with ``autocast`` set, CUDA autocast's
    casts too: fp32 inputs of matrix products and attention run in that dtype (autocast's
    own dispatch keys skip the meta device)."""

    _LOW = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
            torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm,
            F.linear, F.scaled_dot_product_attention}

    def __init__(self, autocast: torch.dtype | None):
        super().__init__()
        self.autocast = autocast

    @contextlib.contextmanager
    def paused(self):
        """No casts for the block, as ``torch.autocast(enabled=False)`` would give."""
        saved, self.autocast = self.autocast, None
        try:
            yield
        finally:
            self.autocast = saved

    def _cast(self, a):
        if isinstance(a, torch.Tensor) and a.dtype == torch.float32:
            return a.to(self.autocast)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.autocast is not None and func in self._LOW:
            args = tuple(self._cast(a) for a in args)
            kwargs = {k: self._cast(v) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention and args[0].device.type == "meta":
            return _flash_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """q [B, Hq, L, D], k/v [B, Hkv, Lk, D] -> [B, Hq, L, D]; foldmesh's masks are causal
    (top-left, or ``causal_lower_right`` under cp), which changes no shape.

    Multi-head Latent Attention's v heads [B, Hq, Lk, Dv] are smaller than q's and k's,
    which flash attention does not take (it needs one head size): CUDA runs the
    memory-efficient kernel then, and so does this (it saves the same q, k, v, output and
    log-sum-exp, the latter padded to a multiple of 32 positions)."""
    if v.shape[-1] != q.shape[-1]:
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, dropout_p, True, scale=scale)
        return out[0]
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, True, False,
                                                             scale=scale)
    return out[0]
