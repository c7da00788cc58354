"""Grouped GEMM on ``torch._grouped_mm``: PyTorch's CUTLASS kernel, with its rules and fallbacks.

Dimension legend: N rows (all groups back to back), K reduction size, M output columns,
G groups. Same contract as ``grouped_gemm_ref``: ``y[offsets[g-1]:offsets[g]] = x[...] @ w[g]``,
rows past ``offsets[-1]`` give zero rows, a group without rows gets a zero weight gradient.

What ``torch._grouped_mm(x [N, K], w [G, K, M], offs=[G] int32)`` requires (torch 2.11-2.13:
``aten/src/ATen/native/GroupedMMUtils.h``, ``cuda/GroupedBlas.cpp``, ``cuda/GroupMM.cu``):

* dtypes float32, bfloat16 or float16, x and w alike; the output has x's dtype.
* every matrix row- or column-major, its leading stride a multiple of 16 bytes: K and M must
  be multiples of 8 (16-bit) or 4 (float32); on CUDA, data pointers 16-byte aligned.
* offs int32, 1-D: rows fit in int32.
* CUDA: the CUTLASS kernel (no host sync) runs only for bfloat16 on compute capability 9.x or
  10.x (sm90/sm100), with fewer than 1024 groups. Anything else takes
  ``_grouped_mm_fallback``, a loop over groups that copies ``offs`` to the host (a sync per
  call) - so this module sends those cases to the next backend instead. (The meta kernel, used
  under torch.compile, accepts bfloat16 only.)
* CPU (torch 2.13): forward in all three dtypes through the same per-group loop.

What it does not do, and this module does instead, all on the device (no host sync):

* rows past ``offs[-1]`` of the output are never written (uninitialised memory): they, and
  the same rows of dx, are zeroed with one masked pass.
* its own autograd formula calls ``_grouped_mm`` on the incoming gradient as is, which fails
  for a stride-0 gradient (``y.sum().backward()``: "Invalid strides/sizes") and gives
  uninitialised dx rows past ``offs[-1]``; the backward here makes dy contiguous and aligned.
* the weight gradient is a 2d x 2d ``_grouped_mm`` (x^T column-major, dy row-major, the one
  layout in which CUTLASS accepts empty groups); groups without rows are zeroed explicitly.

A case outside the rules falls back (triton on CUDA, torch elsewhere) and the reason, naming
the rule, is logged once per distinct reason on the ``foldmesh.kernels`` logger.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from ._grouped_gemm_ref import check_grouped_gemm_args, group_sizes

__all__ = ["grouped_mm_problem", "grouped_gemm_grouped_mm", "log_fallback", "Facts", "rules"]

log = logging.getLogger("foldmesh.kernels")
_logged: set[str] = set()
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Facts:
    """What the rules look at, read from the tensors' metadata (never their values)."""

    device: str  # "cuda", "cpu", "meta" (shapes only: what torch.compile traces), ...
    capability: tuple[int, int] | None  # CUDA compute capability, None elsewhere
    dtype: torch.dtype
    n: int
    k: int
    m: int
    groups: int
    aligned_pointers: bool  # w starts on a 16-byte boundary (x is copied when it does not)
    has_op: bool  # torch._grouped_mm exists
    rocm: bool = False


def rules(f: Facts) -> str | None:
    """Why ``torch._grouped_mm`` must not run this problem (naming the rule), or None."""
    if not f.has_op:
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if f.device not in ("cuda", "cpu", "meta") or f.rocm:
        where = "ROCm" if f.rocm else f.device
        return f"foldmesh runs torch._grouped_mm on CUDA (sm90/sm100) and CPU only, not {where}"
    if f.device in ("cuda", "meta"):  # the meta kernel (shapes only) takes CUDA's dtypes
        major, minor = f.capability or (9, 0)
        if major not in (9, 10):
            return (
                "torch._grouped_mm runs its CUTLASS kernel only on sm90/sm100 GPUs, this is "
                f"sm{major}{minor} (elsewhere it loops over groups with a host sync)"
            )
        if f.dtype != torch.bfloat16:
            return (
                "torch._grouped_mm runs its CUTLASS kernel only for bfloat16 on CUDA, got "
                f"{f.dtype} (other dtypes loop over groups with a host sync)"
            )
        if f.groups >= 1024:
            return f"torch._grouped_mm's CUTLASS kernel takes fewer than 1024 groups: {f.groups}"
    elif f.dtype not in _DTYPES:
        return f"torch._grouped_mm takes float32, bfloat16 or float16, got {f.dtype}"
    size = torch.empty((), dtype=f.dtype).element_size()
    if (f.k * size) % 16 or (f.m * size) % 16:
        return (f"torch._grouped_mm needs row strides that are multiples of 16 bytes: K = {f.k} "
                f"and M = {f.m} must be multiples of {16 // size} in {f.dtype}")  # fmt: skip
    if f.n > _INT32_MAX:
        return f"torch._grouped_mm takes int32 offsets: N = {f.n} rows do not fit"
    if not f.aligned_pointers:
        return "torch._grouped_mm needs w to start on a 16-byte boundary on CUDA"
    return None


@functools.cache
def _cpu_problem(dtype: torch.dtype) -> str | None:
    # Whether this torch build has a CPU kernel for the dtype: one tiny call answers it.
    try:
        x, w = torch.zeros(1, 8, dtype=dtype), torch.zeros(1, 8, 8, dtype=dtype)
        torch._grouped_mm(x, w, offs=torch.ones(1, dtype=torch.int32))
    except (RuntimeError, NotImplementedError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"torch {torch.__version__} cannot run torch._grouped_mm on CPU in {dtype}: {first}"
    return None


def grouped_mm_problem(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> str | None:
    """Check the arguments, then say why ``torch._grouped_mm`` cannot take them (or None).

    Raises:
        ValueError, TypeError: bad shapes or mixed dtypes, as every backend does.
    """
    check_grouped_gemm_args(x, w, offsets)
    if x.dtype != w.dtype:
        raise TypeError(f"x and w must share a dtype, got {x.dtype} and {w.dtype}")
    cuda = x.device.type == "cuda"
    facts = Facts(
        device=x.device.type,
        capability=torch.cuda.get_device_capability(x.device) if cuda else None,
        dtype=x.dtype, n=x.shape[0], k=x.shape[1], m=w.shape[2], groups=w.shape[0],
        aligned_pointers=not cuda or w.data_ptr() % 16 == 0,
        has_op=hasattr(torch, "_grouped_mm"), rocm=bool(torch.version.hip),
    )  # fmt: skip
    problem = rules(facts)
    if problem is None and x.device.type == "cpu" and x.dtype in _DTYPES:
        problem = _cpu_problem(x.dtype)
    return problem


def log_fallback(problem: str, backend: str) -> None:
    """Log a fallback once per distinct reason (``foldmesh.kernels`` logger, WARNING)."""
    if problem not in _logged:
        _logged.add(problem)
        log.warning("kernel backend 'grouped_mm' falls back to %r: %s", backend, problem)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` [R, C] row-major with a 16-byte-multiple row stride on a 16-byte boundary."""
    size = t.element_size()
    ok = (t.stride(1) == 1 and t.stride(0) >= max(1, t.shape[1])
          and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0)  # fmt: skip
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _per_matrix_ok(w: torch.Tensor) -> bool:
    size, (_, rows, cols), (_, s_r, s_c) = w.element_size(), w.shape, w.stride()
    if s_c == 1 and s_r >= max(1, cols):
        return (s_r * size) % 16 == 0
    if s_r == 1 and s_c >= max(1, rows):
        return (s_c * size) % 16 == 0
    return False


def _zero_rows_past(y: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    # On the device: the tail's length is not known on the host, and reading it would sync.
    rows = torch.arange(y.shape[0], device=y.device)
    return y.masked_fill_((rows >= end).unsqueeze(1), 0)


class _GroupedMM(torch.autograd.Function):
    """y = x @ w[g] per group; dx = dy @ w[g]^T per group, dw[g] = x_g^T @ dy_g."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        x = _row_major(x)
        w = w if _per_matrix_ok(w) else w.contiguous()
        offs = offsets.to(torch.int32)
        ctx.save_for_backward(x, w, offs)
        ctx.empty = x.numel() == 0 or w.numel() == 0
        if ctx.empty:  # N, K, M or G is 0: nothing to multiply (and CUTLASS has no K = 0 path)
            return x.new_zeros(x.shape[0], w.shape[2])
        y = torch._grouped_mm(x, w, offs=offs)
        return _zero_rows_past(y, offs[-1])

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dx = dw = None
        if ctx.empty:
            dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
            dw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
            return dx, dw, None
        dy = _row_major(dy)
        if ctx.needs_input_grad[0]:
            dx = _zero_rows_past(torch._grouped_mm(dy, w.transpose(1, 2), offs=offs), offs[-1])
        if ctx.needs_input_grad[1]:
            dw = torch._grouped_mm(x.t(), dy, offs=offs)
            dw = dw.masked_fill_((group_sizes(offs) == 0).view(-1, 1, 1), 0)
        return dx, dw, None


def grouped_gemm_grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """``torch._grouped_mm`` twin of ``grouped_gemm_ref``, differentiable in x and w.

    Args:
        x: [N, K]; w: [G, K, M] in x.dtype; offsets: [G] int (any integer dtype; converted to
            int32 on the device), inclusive cumsum of the group sizes. The caller has checked
            ``grouped_mm_problem(x, w, offsets) is None``.

    Returns:
        y [N, M] in x.dtype, accumulated in float32; rows past ``offsets[-1]`` are zero.
        x is copied first if it is not row-major with an aligned row stride (the weight
        gradient needs x^T column-major), w if a matrix is neither row- nor column-major.
    """
    return _GroupedMM.apply(x, w, offsets)
