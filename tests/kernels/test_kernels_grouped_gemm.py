"""grouped_gemm and swiglu_experts against per-group loops, forward and backward.

Inputs are drawn on the CPU and the kernels run on ``DEVICE`` (see kernels_naive). The
grouped_mm backend joins the parametrisation: these shapes are mostly not 16-byte aligned, so
it mostly exercises its fallback here; test_kernels_grouped_mm.py tests the kernel itself.
"""

from __future__ import annotations

import pytest
import torch
from foldmesh.kernels import grouped_gemm, swiglu, swiglu_experts
from foldmesh.kernels._experts import swiglu_ref
from foldmesh.kernels._grouped_gemm_ref import grouped_gemm_ref
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_naive import (
    BACKENDS,
    DEVICE,
    GEMM_BACKENDS,
    assert_close,
    leaf,
    naive_grouped_gemm,
    naive_swiglu_experts,
    on_device,
)

DTYPES = [torch.float32, torch.bfloat16]


@st.composite
def group_sizes(draw, max_groups: int, max_rows: int):
    """Group sizes with empty groups, a single busy group, and sometimes trailing rows."""
    n_groups = draw(st.integers(1, max_groups))
    mode = draw(st.sampled_from(["random", "sparse", "one"]))
    if mode == "one":
        sizes = [0] * n_groups
        sizes[draw(st.integers(0, n_groups - 1))] = draw(st.integers(0, max_rows))
    else:
        upper = 2 if mode == "sparse" else max(1, max_rows // n_groups)
        sizes = draw(st.lists(st.integers(0, upper), min_size=n_groups, max_size=n_groups))
    tail = draw(st.sampled_from([0, 0, 0, 5]))
    return sizes, tail


def _run_gemm(backend, sizes, tail, k_dim, m_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    n_rows = sum(sizes) + tail
    x = torch.randn(n_rows, k_dim, generator=gen).to(dtype)
    w = torch.randn(len(sizes), k_dim, m_dim, generator=gen).to(dtype)
    offsets = on_device(torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0))
    xk, wk = leaf(x, device=DEVICE), leaf(w, device=DEVICE)
    x64, w64 = leaf(x, torch.float64), leaf(w, torch.float64)
    y = grouped_gemm(xk, wk, offsets, backend=backend)
    expected = naive_grouped_gemm(x64, w64, sizes)
    assert y.dtype == dtype and y.shape == (n_rows, m_dim)
    assert_close(y, expected, dtype)
    assert not y[sum(sizes) :].any()

    dy = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(on_device(dy))
    expected.backward(dy.double())
    assert_close(xk.grad, x64.grad, dtype)
    assert_close(wk.grad, w64.grad, dtype)
    for g, size in enumerate(sizes):
        if size == 0:
            assert not wk.grad[g].any(), f"group {g} has no rows but a non-zero weight gradient"


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_grouped_gemm_matches_naive(backend):
    @settings(max_examples=25, deadline=None)
    @given(
        groups=group_sizes(max_groups=24 if backend == "triton" else 64, max_rows=96),
        k_dim=st.integers(1, 72),
        m_dim=st.integers(1, 72),
        dtype=st.sampled_from(DTYPES),
        seed=st.integers(0, 2**16),
    )
    def check(groups, k_dim, m_dim, dtype, seed):
        _run_gemm(backend, *groups, k_dim, m_dim, dtype, seed)

    check()


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_gemm_edge_shapes(backend, dtype):
    """No rows at all; one group; 64 groups all empty but one; sizes across tile edges."""
    for sizes, tail, k_dim, m_dim in [
        ([0], 0, 8, 8),
        ([0, 0, 0], 4, 16, 5),
        ([37], 0, 33, 65),
        ([0] * 63 + [40], 0, 17, 9),
        ([31, 1, 33, 0, 64], 3, 48, 40),
    ]:
        _run_gemm(backend, sizes, tail, k_dim, m_dim, dtype, seed=1)


def test_grouped_gemm_reference_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = leaf(torch.randn(9, 4, generator=gen, dtype=torch.float64), device=DEVICE)
    w = leaf(torch.randn(3, 4, 5, generator=gen, dtype=torch.float64), device=DEVICE)
    offsets = on_device(torch.tensor([4, 4, 7]))  # an empty group and two trailing rows
    assert torch.autograd.gradcheck(lambda x, w: grouped_gemm_ref(x, w, offsets), (x, w))


def _run_experts(backend, sizes, hidden, ffn, with_probs, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    n_rows, n_groups = sum(sizes), len(sizes)
    x = torch.randn(n_rows, hidden, generator=gen).to(dtype)
    w_gate_up = (torch.randn(n_groups, hidden, 2 * ffn, generator=gen) / hidden**0.5).to(dtype)
    w_down = (torch.randn(n_groups, ffn, hidden, generator=gen) / ffn**0.5).to(dtype)
    probs = torch.rand(n_rows, generator=gen) if with_probs else None
    inputs = [t for t in (x, w_gate_up, w_down, probs) if t is not None]
    mine = [leaf(t, device=DEVICE) for t in inputs]
    ref = [leaf(t, torch.float64) for t in inputs]
    counts = on_device(torch.tensor(sizes, dtype=torch.int64))
    out = swiglu_experts(*mine[:3], counts, *mine[3:], backend=backend)
    expected = naive_swiglu_experts(*ref[:3], sizes, *ref[3:])
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(on_device(grad))
    expected.backward(grad.double())
    for got, want in zip(mine, ref, strict=True):
        assert_close(got.grad, want.grad, dtype)


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@settings(max_examples=10, deadline=None)
@given(
    groups=group_sizes(max_groups=8, max_rows=48),
    hidden=st.integers(1, 40),
    ffn=st.integers(1, 40),
    with_probs=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_swiglu_experts_match_naive(backend, groups, hidden, ffn, with_probs, dtype, seed):
    _run_experts(backend, groups[0], hidden, ffn, with_probs, dtype, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_activation_matches_reference(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(37, 2 * 45, generator=gen).mul(3).to(dtype)
    probs = torch.rand(37, generator=gen)
    for p in (probs, None):
        h_k, h_64 = leaf(h, device=DEVICE), leaf(h, torch.float64)
        p_k = leaf(p, device=DEVICE) if p is not None else None
        p_64 = leaf(p, torch.float64) if p is not None else None
        out = swiglu(h_k, p_k, backend=backend)
        expected = swiglu_ref(h_64, p_64)
        assert_close(out, expected, dtype)
        grad = torch.randn(out.shape, generator=gen).to(dtype)
        out.backward(on_device(grad))
        expected.backward(grad.double())
        assert_close(h_k.grad, h_64.grad, dtype)
        if p is not None:
            assert_close(p_k.grad, p_64.grad, dtype)


def test_swiglu_reference_gradcheck():
    gen = torch.Generator().manual_seed(0)

    def draw(*size, uniform=False):
        t = (torch.rand if uniform else torch.randn)(*size, generator=gen, dtype=torch.float64)
        return leaf(t, device=DEVICE)

    h, probs = draw(6, 8), draw(6, uniform=True)
    assert torch.autograd.gradcheck(swiglu_ref, (h, probs))
    x, w1, w2 = draw(7, 3), draw(3, 3, 4), draw(3, 2, 3)
    counts = on_device(torch.tensor([3, 0, 4]))
    p = draw(7, uniform=True)
    assert torch.autograd.gradcheck(
        lambda x, w1, w2, p: swiglu_experts(x, w1, w2, counts, p, backend="torch"),
        (x, w1, w2, p),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_follow_autocast(backend):
    """Under autocast float32 inputs are cast as a matmul's would be; the gradients of the
    float32 leaves come back in float32; without autocast nothing changes."""
    gen = torch.Generator().manual_seed(0)
    x = leaf(torch.randn(12, 16, generator=gen))
    w = leaf(torch.randn(3, 16, 8, generator=gen))
    w_down = leaf(torch.randn(3, 4, 16, generator=gen))
    counts = torch.tensor([5, 0, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_gemm(x, w, torch.cumsum(counts, 0), backend=backend)
        z = swiglu_experts(x, w, w_down, counts, backend=backend)
    assert y.dtype == z.dtype == torch.bfloat16
    (y.float().sum() + z.float().sum()).backward()
    assert x.grad.dtype == w.grad.dtype == w_down.grad.dtype == torch.float32
    assert_close(y, naive_grouped_gemm(x.double(), w.double(), [5, 0, 7]), torch.bfloat16)
    assert grouped_gemm(x, w, torch.cumsum(counts, 0), backend=backend).dtype == torch.float32
