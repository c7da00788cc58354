"""Naive loop references and shared helpers for the kernel tests.

Written independently of ``foldmesh.kernels``: plain Python loops over tokens, experts and
groups, evaluated in float64 with ordinary (differentiable) torch ops, so their autograd gives
the expected gradients too.

Tolerances (``assert_close``), comparing a kernel in ``dtype`` with the float64 naive result:

* pure data movement (permuted tokens, chunk sort): bitwise equal in every dtype;
* float32: rtol 1e-4, atol 1e-4 x the largest expected magnitude (sums over up to a few hundred
  terms; TF32 is off, so the only error is float32 rounding);
* bfloat16: rtol 2e-2, atol 2e-2 x the largest expected magnitude: inputs are bfloat16, the
  kernels accumulate in float32 and round the result once (bfloat16 has an 8-bit mantissa,
  one ulp is 0.4-0.8 %), and torch's CPU bfloat16 ops may round intermediates too;
* float16 (only the grouped_mm backend takes it): rtol 2e-3, atol 2e-3 x the largest expected
  magnitude (an 11-bit mantissa, one ulp is 0.05-0.1 %, and the result is rounded once);
* float64 (reference gradcheck): ``torch.autograd.gradcheck`` defaults.

Device: every test makes its inputs with a CPU generator (the same values everywhere) and runs
the kernels on ``DEVICE``, CUDA when torch sees a GPU and CPU otherwise; the float64 naive
references stay on CPU and ``assert_close`` brings results there to compare.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from foldmesh.kernels._backend import interpreter_problem


def choose_device() -> torch.device:
    """Where the kernel tests run: the GPU when torch sees one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


DEVICE = choose_device()
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
# Why the Triton kernels cannot run here (None when they can): on CPU they run through
# Triton's interpreter (TRITON_INTERPRET=1), which some Triton/NumPy pairs cannot run.
TRITON_SKIP = "triton missing" if not HAS_TRITON else (
    None if DEVICE.type == "cuda" else interpreter_problem())
# Parametrisation shared by the tests.
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(TRITON_SKIP is not None,
                                                    reason=str(TRITON_SKIP))),
]
# The grouped GEMMs (grouped_gemm, swiglu_experts) also take torch._grouped_mm.
GEMM_BACKENDS = [
    *BACKENDS,
    pytest.param("grouped_mm", marks=pytest.mark.skipif(
        not HAS_GROUPED_MM, reason=f"torch {torch.__version__} has no torch._grouped_mm")),
]
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
    torch.float64: (1e-10, 1e-10),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare on the CPU in float64 with the per-dtype tolerance above; atol scales with the
    expected magnitude."""
    rtol, atol = TOLERANCES[dtype]
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def random_routing(
    gen: torch.Generator, n_tokens: int, n_experts: int, topk: int, mode: str, ties: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, k] distinct expert ids per token and [T, k] probabilities.

    mode: "uniform"; "subset" (only the first k + 1 experts receive tokens, the rest none);
    "one" (every token picks expert 0, so it receives all T tokens). ``ties`` quantises the
    probabilities to quarters so that drop-by-probability must break ties by token index.
    """
    scores = torch.rand(n_tokens, n_experts, generator=gen)
    if mode == "subset":
        scores[:, topk + 1 :] = -1.0
    elif mode == "one":
        scores[:, 0] = 2.0
    idx = scores.topk(topk, dim=1).indices
    if ties:
        probs = torch.randint(1, 5, (n_tokens, topk), generator=gen).float() / 4
    else:
        probs = torch.rand(n_tokens, topk, generator=gen)
    return idx, probs


def naive_permute(x, idx, probs, n_experts, capacity=None, policy="probs", pad=False):
    """Loop reference of ``permute``: (tokens, probs, counts, row_map) as float64/lists."""
    n_tokens, topk = idx.shape
    ranks = probs.detach()
    rows, row_probs, counts = [], [], []
    row_map = [[-1] * topk for _ in range(n_tokens)]
    zero = x.new_zeros(x.shape[1], dtype=torch.float64)
    for e in range(n_experts):
        copies = [(t, j) for t in range(n_tokens) for j in range(topk) if int(idx[t, j]) == e]
        if capacity is not None and len(copies) > capacity:
            if policy == "position":
                copies = copies[:capacity]
            else:
                ranked = sorted(copies, key=lambda c: (-ranks[c].item(), c))
                copies = sorted(ranked[:capacity])
        for t, j in copies:
            row_map[t][j] = len(rows)
            rows.append(x[t].to(torch.float64))
            row_probs.append(probs[t, j].to(torch.float64))
        n_pad = capacity - len(copies) if pad else 0
        rows += [zero] * n_pad
        row_probs += [torch.zeros((), dtype=torch.float64)] * n_pad
        counts.append(len(copies) + n_pad)
    tokens = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1], dtype=torch.float64)
    out_probs = torch.stack(row_probs) if row_probs else torch.zeros(0, dtype=torch.float64)
    return tokens, out_probs, counts, row_map


def naive_unpermute(y, row_map, probs=None):
    """Loop reference of ``unpermute`` in float64."""
    out = []
    for t, rows in enumerate(row_map):
        acc = y.new_zeros(y.shape[1], dtype=torch.float64)
        for j, r in enumerate(rows):
            if r >= 0:
                w = 1.0 if probs is None else probs[t, j].to(torch.float64)
                acc = acc + w * y[r].to(torch.float64)
        out.append(acc)
    return torch.stack(out) if out else y.new_zeros(0, y.shape[1], dtype=torch.float64)


def naive_sort_chunks(x, sizes, n_ranks, n_experts, inverse=False):
    """Slice the chunks out in input order and concatenate them in output order."""
    sizes = [int(s) for s in sizes]
    table = [[sizes[r * n_experts + e] for e in range(n_experts)] for r in range(n_ranks)]
    if inverse:  # input is (e, r) ordered
        keys = [(e, r) for e in range(n_experts) for r in range(n_ranks)]
        out_keys = [(e, r) for r in range(n_ranks) for e in range(n_experts)]
    else:
        keys = [(e, r) for r in range(n_ranks) for e in range(n_experts)]
        out_keys = [(e, r) for e in range(n_experts) for r in range(n_ranks)]
    chunks, start = {}, 0
    for e, r in keys:
        chunks[(e, r)] = x[start : start + table[r][e]]
        start += table[r][e]
    return torch.cat([chunks[k] for k in out_keys] + [x[start:]])


def naive_grouped_gemm(x, w, sizes):
    """Per-group matmul in float64; rows past the groups are zero."""
    out, start = [], 0
    for g, size in enumerate(sizes):
        out.append(x[start : start + size].to(torch.float64) @ w[g].to(torch.float64))
        start += size
    out.append(x.new_zeros(x.shape[0] - start, w.shape[2], dtype=torch.float64))
    return torch.cat(out)


def naive_swiglu_experts(x, w_gate_up, w_down, sizes, probs=None):
    """SwiGLU FFN per group, float64."""
    h = naive_grouped_gemm(x, w_gate_up, sizes)
    gate, up = h.chunk(2, dim=1)
    a = F.silu(gate) * up
    if probs is not None:
        a = a * probs.to(torch.float64).unsqueeze(1)
    return naive_grouped_gemm(a, w_down, sizes)


def leaf(
    t: torch.Tensor, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """A fresh leaf copy that requires grad (on ``device``, default ``t``'s)."""
    return t.detach().to(device or t.device, dtype or t.dtype).clone().requires_grad_(True)


def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` moved to ``DEVICE`` (None stays None)."""
    return None if t is None else t.to(DEVICE)
