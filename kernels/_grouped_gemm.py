"""Triton grouped GEMM: one launch for all experts, group sizes read from device offsets.

Dimension legend: N rows (all groups back to back), K reduction size, M output columns,
G groups (experts). ``offsets`` [G] is the inclusive cumulative sum of the group sizes, so group
g owns rows ``offsets[g-1]:offsets[g]`` (group 0 starts at row 0).

* forward ``y = x @ w[g]`` per group, and the input gradient ``dx = dy @ w[g]^T`` (the same
  kernel reading w through transposed strides): a tile-scheduled kernel. The grid is the static
  upper bound ``(cdiv(N, BLOCK_M) + G + 1) * cdiv(M, BLOCK_N)`` on the tile count, so no size
  leaves the device. Each program loads the G+1 offsets, counts every group's m-tiles, scans them
  and finds its group by counting tile ends at or below its own tile; programs past the real
  tile count exit at once. Group G is the tail of rows past ``offsets[-1]``: its tiles skip the
  K loop and store zeros, which spares a separate zero-fill of y. Tiles of one group are
  swizzled in bands of GROUP_M m-tiles so a band shares w[g]'s column block in L2.
* weight gradient ``dw[g] = x_g^T @ dy_g``: one program per (group, K-tile, M-tile) with a loop
  over the group's rows; a group without rows runs no iteration and stores zeros.

Accumulation is float32 for every input dtype. float32 inputs use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` allows it, as torch.matmul does.

Autotuning (what a first step costs): each kernel is tuned once per key, and the keys are the
weight dims K, M, G (plus the dtypes, which Triton adds), never N: the token count may change
from step to step, the weights do not. Before tuning, ``_prune_*`` drops the candidates that
cannot win for the key: tiles wider than the problem (BLOCK_N past M, BLOCK_K past K, rounded
up to powers of two) and tiles whose pipelined operands overflow shared memory (float32
operands need twice the bytes, so most Hopper bf16 tiles cannot run for them and would only
cost a compile). Triton's on-disk cache of autotune results (``cache_results=True`` where this
Triton has it, 3.2 and later) keeps the winners across processes, so only the first run on a
machine benchmarks. ``FOLDMESH_AUTOTUNE=0`` skips benchmarking altogether (first fitting
candidate).
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

from ._backend import check_triton_dtype, interpret_mode
from ._grouped_gemm_ref import check_grouped_gemm_args

__all__ = ["grouped_gemm_fwd", "grouped_gemm_wgrad", "grouped_gemm_triton"]


def _configs(
    names: tuple[str, ...], big: list[tuple[int, ...]], small: tuple[int, ...]
) -> list[triton.Config]:
    """Autotune candidates: ``big`` rows are (*block sizes, num_warps, num_stages) for Hopper.

    Under the interpreter a single ``small`` config is used: it is slow per program, and
    autotuning would run every candidate.
    """
    if interpret_mode():
        return [triton.Config(dict(zip(names, small, strict=True)), num_warps=1, num_stages=1)]
    n = len(names)
    return [
        triton.Config(dict(zip(names, c[:n], strict=True)), num_warps=c[n], num_stages=c[n + 1])
        for c in big
    ]


_FWD_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
_FWD_HOPPER = [
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 4),
    (64, 256, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 3),
]
_FWD_CONFIGS = _configs(_FWD_NAMES, _FWD_HOPPER, small=(32, 32, 32, 4))
# The weight-gradient tile is BLOCK_K x BLOCK_N of dw[g]; BLOCK_R rows are reduced per step.
_WGRAD_NAMES = ("BLOCK_K", "BLOCK_N", "BLOCK_R")
_WGRAD_HOPPER = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 4, 4),
    (64, 128, 64, 4, 4),
]
_WGRAD_CONFIGS = _configs(_WGRAD_NAMES, _WGRAD_HOPPER, small=(32, 32, 32))


@functools.cache
def _shared_memory(device_index: int) -> int:
    """Bytes of shared memory one program may use on this GPU (227 KiB on H100/H200)."""
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except Exception:  # an older driver API: assume Hopper's opt-in limit
        return 232448


def _keep(configs: list, fits) -> list:
    kept = [c for c in configs if fits(c.kwargs, c.num_stages)]
    # Never prune everything: the narrowest tile (in M, then K: the problem dims) always runs.
    kept = kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                                 _volume(c.kwargs), c.num_stages))]  # fmt: skip
    # FOLDMESH_AUTOTUNE=0: no benchmarking, the first candidate that fits (the lists are in
    # order of preference), so a first step costs one compile per kernel variant.
    return kept[:1] if os.environ.get("FOLDMESH_AUTOTUNE", "1").strip() == "0" else kept


def _volume(kw: dict) -> int:
    out = 1
    for name, v in kw.items():
        out *= v if name.startswith("BLOCK") else 1
    return out


def _cap(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def _pruner(stage_elems):
    """An ``early_config_prune`` that drops tiles wider than M (BLOCK_N) or deeper than K
    (BLOCK_K), and tiles whose ``num_stages`` copies of ``stage_elems(kwargs)`` operand elements
    overflow shared memory."""

    def prune(configs, named_args, **kwargs):
        x = named_args["x_ptr"]
        m_cap, k_cap = _cap(named_args["M"]), _cap(named_args["K"])
        smem = _shared_memory(x.device.index or 0) if x.is_cuda else None

        def fits(kw, stages):
            if kw["BLOCK_N"] > m_cap or kw["BLOCK_K"] > k_cap:
                return False
            return smem is None or stages * stage_elems(kw) * x.element_size() <= smem

        return _keep(configs, fits)

    return prune


# Per stage the forward holds an x tile BLOCK_M x BLOCK_K and a w tile BLOCK_K x BLOCK_N ...
_prune_fwd = _pruner(lambda kw: (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"])
# ... and the weight gradient an x^T tile BLOCK_K x BLOCK_R and a dy tile BLOCK_R x BLOCK_N.
_prune_wgrad = _pruner(lambda kw: (kw["BLOCK_K"] + kw["BLOCK_N"]) * kw["BLOCK_R"])


def _autotune(configs: list, prune):
    # Keys are weight dims only (see the module docstring). cache_results: Triton >= 3.2.
    options = dict(configs=configs, key=["K", "M", "G"],
                   prune_configs_by={"early_config_prune": prune})  # fmt: skip
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = True
    return triton.autotune(**options)


@_autotune(_FWD_CONFIGS, _prune_fwd)
@triton.jit(do_not_specialize=["N"])
def _grouped_gemm_kernel(
    x_ptr, w_ptr, y_ptr, offs_ptr,
    N, K, M, G,
    stride_xn, stride_xk, stride_wg, stride_wk, stride_wm, stride_yn, stride_ym,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, GROUPS_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    # Group table: index G is the tail past offsets[-1]; lanes past G own no tiles.
    g = tl.arange(0, GROUPS_POW2)
    ends = tl.load(offs_ptr + g, mask=g < G, other=N).to(tl.int32)
    starts = tl.load(offs_ptr + g - 1, mask=(g > 0) & (g <= G), other=0).to(tl.int32)
    m_tiles = tl.where(g <= G, tl.cdiv(ends - starts, BLOCK_M), 0)
    tiles_end = tl.cumsum(m_tiles, axis=0)
    n_tiles = tl.cdiv(M, BLOCK_N)
    if tile >= tl.sum(m_tiles, axis=0) * n_tiles:
        return
    # A group's tiles are contiguous and n_tiles per m-tile, so tile // n_tiles is a global
    # m-tile index; the group is the number of groups whose tiles all come before it.
    grp = tl.sum((tiles_end <= tile // n_tiles).to(tl.int32), axis=0)
    mine = g == grp
    grp_m_tiles = tl.sum(tl.where(mine, m_tiles, 0), axis=0)
    local = tile - tl.sum(tl.where(mine, tiles_end - m_tiles, 0), axis=0) * n_tiles
    row_start = tl.sum(tl.where(mine, starts, 0), axis=0)
    row_end = tl.sum(tl.where(mine, ends, 0), axis=0)

    band_tiles = GROUP_M * n_tiles
    first_m = (local // band_tiles) * GROUP_M
    band_m = tl.minimum(grp_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (local % band_tiles) % band_m
    pid_n = (local % band_tiles) // band_m

    rows = row_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xn + ks[None, :] * stride_xk
    w_ptrs = (w_ptr + grp.to(tl.int64) * stride_wg + ks[:, None] * stride_wk
              + cols[None, :] * stride_wm)  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_iters = tl.where(grp < G, tl.cdiv(K, BLOCK_K), 0)
    for it in range(0, k_iters):
        k_ok = ks < K - it * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yn + cols[None, :] * stride_ym
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@_autotune(_WGRAD_CONFIGS, _prune_wgrad)
@triton.jit
def _grouped_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, offs_ptr,
    K, M, G,
    stride_xn, stride_xk, stride_yn, stride_ym, stride_wg, stride_wk, stride_wm,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    grp = tl.program_id(1)
    n_tiles = tl.cdiv(M, BLOCK_N)
    pid_k = tl.program_id(0) // n_tiles
    pid_n = tl.program_id(0) % n_tiles
    row_start = tl.load(offs_ptr + grp - 1, mask=grp > 0, other=0).to(tl.int32)
    row_end = tl.load(offs_ptr + grp).to(tl.int32)

    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        # x_g^T tile [BLOCK_K, BLOCK_R]: read x row-major, let tl.dot take it transposed.
        a = tl.load(x_ptr + rows64[None, :] * stride_xn + ks[:, None] * stride_xk,
                    mask=k_ok[:, None] & row_ok[None, :], other=0.0)  # fmt: skip
        b = tl.load(dy_ptr + rows64[:, None] * stride_yn + cols[None, :] * stride_ym,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    dw_ptrs = (dw_ptr + grp.to(tl.int64) * stride_wg + ks[:, None] * stride_wk
               + cols[None, :] * stride_wm)  # fmt: skip
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


def _dot_flags(dtype: torch.dtype) -> dict:
    # Only float32 operands read the precision; 16-bit ones keep Triton's default.
    ieee = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return dict(
        PRECISION="ieee" if ieee else "tf32",
        # The interpreter's bfloat16 dot is wrong in triton 3.9 (numpy has no bfloat16); fp32
        # operands give the same result as the fp32-accumulating tensor-core dot.
        DOT_FP32=interpret_mode() and dtype == torch.bfloat16,
    )


def _check(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    check_grouped_gemm_args(x, w, offsets)
    if x.dtype != w.dtype:
        raise TypeError(f"x and w must share a dtype, got {x.dtype} and {w.dtype}")


def grouped_gemm_fwd(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``y[rows of g] = x[rows of g] @ w[g]``; rows past ``offsets[-1]`` are zero.

    Args:
        x: [N, K]; w: [G, K, M] (any strides, so ``w.transpose(1, 2)`` gives the dx GEMM);
        offsets: [G] int, inclusive cumsum of group sizes, on x's device.

    Returns:
        y [N, M] in x.dtype.
    """
    _check(x, w, offsets)
    n_rows, k_dim = x.shape
    n_groups, _, m_dim = w.shape
    y = torch.empty((n_rows, m_dim), dtype=x.dtype, device=x.device)
    if n_rows == 0 or m_dim == 0:
        return y
    if k_dim == 0:
        return y.zero_()
    offsets = offsets.to(torch.int32)

    def grid(meta):
        m_tiles = triton.cdiv(n_rows, meta["BLOCK_M"]) + n_groups + 1
        return (m_tiles * triton.cdiv(m_dim, meta["BLOCK_N"]),)

    _grouped_gemm_kernel[grid](
        x, w, y, offsets, n_rows, k_dim, m_dim, n_groups,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
        GROUPS_POW2=triton.next_power_of_2(n_groups + 1), **_dot_flags(x.dtype),
    )  # fmt: skip
    return y


def grouped_gemm_wgrad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``dw[g] = x[rows of g]^T @ dy[rows of g]``; groups without rows get zeros.

    Args:
        x: [N, K]; dy: [N, M]; offsets: [G] int, inclusive cumsum of group sizes.

    Returns:
        dw [G, K, M] in x.dtype.
    """
    k_dim, m_dim = x.shape[1], dy.shape[1]
    n_groups = offsets.shape[0]
    dw = torch.empty((n_groups, k_dim, m_dim), dtype=x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    offsets = offsets.to(torch.int32)

    def grid(meta):
        return (triton.cdiv(k_dim, meta["BLOCK_K"]) * triton.cdiv(m_dim, meta["BLOCK_N"]),
                n_groups)  # fmt: skip

    _grouped_wgrad_kernel[grid](
        x, dy, dw, offsets, k_dim, m_dim, n_groups,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        **_dot_flags(x.dtype),
    )  # fmt: skip
    return dw


class _GroupedGemm(torch.autograd.Function):
    """y = x @ w[g] per group; dx = dy @ w[g]^T per group, dw[g] = x_g^T @ dy_g."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return grouped_gemm_fwd(x, w, offsets)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = grouped_gemm_fwd(dy, w.transpose(1, 2), offsets)
        if ctx.needs_input_grad[1]:
            dw = grouped_gemm_wgrad(x, dy, offsets)
        return dx, dw, None


def grouped_gemm_triton(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Differentiable Triton twin of ``grouped_gemm_ref`` (same arguments, same result)."""
    check_triton_dtype(x, w)
    _check(x, w, offsets)
    return _GroupedGemm.apply(x, w, offsets)
