"""The grouped_mm backend (torch._grouped_mm): against the naive loops, its rules and fallbacks.

Shapes here are 16-byte aligned (K and M multiples of 8), so torch._grouped_mm itself runs
wherever its rules allow it: on CPU in float32, bfloat16 and float16; on an sm90/sm100 GPU in
bfloat16 (elsewhere the case falls back and the test checks the fallback's result instead).
"""

from __future__ import annotations

import logging

import pytest
import torch
from foldmesh.kernels import _grouped_mm, grouped_gemm, swiglu_experts
from foldmesh.kernels._grouped_mm import Facts, grouped_mm_problem, rules
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_naive import (
    DEVICE,
    HAS_GROUPED_MM,
    assert_close,
    leaf,
    naive_grouped_gemm,
    naive_swiglu_experts,
    on_device,
)

pytestmark = pytest.mark.skipif(
    not HAS_GROUPED_MM, reason=f"torch {torch.__version__} has no torch._grouped_mm"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def calls(monkeypatch):
    """Counts torch._grouped_mm calls, and gives every test a fresh once-per-reason log."""
    seen = []
    real = torch._grouped_mm

    def spy(*args, **kwargs):
        seen.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    monkeypatch.setattr(_grouped_mm, "_logged", set())
    return seen


def _inputs(sizes, tail, k_dim, m_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes) + tail, k_dim, generator=gen).to(dtype)
    w = torch.randn(len(sizes), k_dim, m_dim, generator=gen).to(dtype)
    offsets = on_device(torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0))
    return gen, x, w, offsets


def _check(sizes, tail, k_dim, m_dim, dtype, seed, calls, sum_backward=False):
    gen, x, w, offsets = _inputs(sizes, tail, k_dim, m_dim, dtype, seed)
    xk, wk = leaf(x, device=DEVICE), leaf(w, device=DEVICE)
    x64, w64 = leaf(x, torch.float64), leaf(w, torch.float64)
    runs = grouped_mm_problem(xk, wk, offsets) is None
    before = len(calls)
    y = grouped_gemm(xk, wk, offsets, backend="grouped_mm")
    expected = naive_grouped_gemm(x64, w64, sizes)
    assert y.dtype == dtype and y.shape == expected.shape
    assert_close(y, expected, dtype)
    assert not y[sum(sizes) :].any(), "rows past offsets[-1] must be zero"
    # A stride-0 gradient (y.sum()) is what torch._grouped_mm's own backward cannot take.
    dy = torch.ones(y.shape) if sum_backward else torch.randn(y.shape, generator=gen)
    (y.sum() if sum_backward else (y * on_device(dy.to(dtype))).sum()).backward()
    expected.backward(dy.to(dtype).double())
    assert_close(xk.grad, x64.grad, dtype)
    assert_close(wk.grad, w64.grad, dtype)
    assert not xk.grad[sum(sizes) :].any()
    for g, size in enumerate(sizes):
        if size == 0:
            assert not wk.grad[g].any(), f"group {g} has no rows but a non-zero weight gradient"
    empty = x.numel() == 0 or w.numel() == 0
    assert (len(calls) - before == 3) == (runs and not empty)  # forward, dx, dw


@st.composite
def problems(draw):
    n_groups = draw(st.integers(1, 12))
    sizes = draw(st.lists(st.sampled_from([0, 0, 1, 3, 8, 17]), min_size=n_groups,
                          max_size=n_groups))  # fmt: skip
    return dict(sizes=sizes, tail=draw(st.sampled_from([0, 0, 5])),
                k_dim=8 * draw(st.integers(1, 8)), m_dim=8 * draw(st.integers(1, 8)),
                dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**16)))  # fmt: skip


def test_grouped_mm_matches_naive(calls):
    @settings(max_examples=40, deadline=None)
    @given(problem=problems())
    def check(problem):
        _check(**problem, calls=calls)

    check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_edge_shapes(dtype, calls):
    """No rows; only empty groups and a tail; one group; a stride-0 incoming gradient."""
    for sizes, tail, k_dim, m_dim, sum_backward in [
        ([0], 0, 8, 8, False),
        ([0, 0, 0], 4, 16, 8, False),
        ([37], 0, 32, 64, True),
        ([0] * 63 + [40], 3, 16, 8, True),
        ([31, 1, 33, 0, 64], 3, 48, 40, True),
    ]:
        _check(sizes, tail, k_dim, m_dim, dtype, seed=1, calls=calls, sum_backward=sum_backward)


def test_grouped_mm_gradient_of_one_input(calls):
    _, x, w, offsets = _inputs([3, 0, 5], 2, 16, 8, torch.float32, seed=0)
    xk, wk = leaf(x, device=DEVICE), on_device(w)
    grouped_gemm(xk, wk, offsets, backend="grouped_mm").sum().backward()
    assert xk.grad is not None and not xk.grad[8:].any()


def test_swiglu_experts_on_grouped_mm(calls):
    gen = torch.Generator().manual_seed(0)
    sizes, hidden, ffn = [5, 0, 11, 2], 16, 24
    x = torch.randn(sum(sizes), hidden, generator=gen).to(torch.bfloat16)
    w1 = (torch.randn(4, hidden, 2 * ffn, generator=gen) / 4).to(torch.bfloat16)
    w2 = (torch.randn(4, ffn, hidden, generator=gen) / 5).to(torch.bfloat16)
    probs = torch.rand(sum(sizes), generator=gen)
    mine = [leaf(t, device=DEVICE) for t in (x, w1, w2, probs)]
    ref = [leaf(t, torch.float64) for t in (x, w1, w2, probs)]
    counts = on_device(torch.tensor(sizes))
    out = swiglu_experts(*mine[:3], counts, mine[3], backend="grouped_mm")
    expected = naive_swiglu_experts(*ref[:3], sizes, ref[3])
    assert_close(out, expected, torch.bfloat16)
    out.sum().backward()
    expected.sum().backward()
    for got, want in zip(mine, ref, strict=True):
        assert_close(got.grad, want.grad, torch.bfloat16)


def test_grouped_mm_needs_no_host_sync():
    """On the meta device any read of a value on the host raises: this path never reads one."""
    x = torch.empty(64, 32, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(4, 32, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.empty(4, device="meta", dtype=torch.int64)
    assert grouped_mm_problem(x, w, offsets) is None
    grouped_gemm(x, w, offsets, backend="grouped_mm").sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


# (dtype, K, M, what the logged reason says on CPU, on CUDA)
FALLBACKS = [
    (torch.float64, 8, 8, "takes float32, bfloat16 or float16", "only for bfloat16 on CUDA"),
    (torch.bfloat16, 12, 8, "K = 12 and M = 8 must be multiples of 8", None),
    (torch.float32, 8, 6, "K = 8 and M = 6 must be multiples of 4", "only for bfloat16"),
]


@pytest.mark.parametrize(("dtype", "k_dim", "m_dim", "on_cpu", "on_cuda"), FALLBACKS)
def test_unsupported_cases_fall_back_with_a_logged_reason(dtype, k_dim, m_dim, on_cpu, on_cuda,
                                                          calls, caplog):  # fmt: skip
    fragment = on_cpu if DEVICE.type == "cpu" else on_cuda or on_cpu
    if DEVICE.type == "cuda" and (
        rule := grouped_mm_problem(
            on_device(torch.zeros(1, 8, dtype=torch.bfloat16)),
            on_device(torch.zeros(1, 8, 8, dtype=torch.bfloat16)),
            on_device(torch.ones(1)),
        )
    ):
        fragment = rule  # this GPU is not sm90/sm100: that rule comes first  # fmt: skip
    _, x, w, offsets = _inputs([3, 0, 4], 2, k_dim, m_dim, dtype, seed=0)
    xk, wk = on_device(x), on_device(w)
    with caplog.at_level(logging.WARNING, logger="foldmesh.kernels"):
        y = grouped_gemm(xk, wk, offsets, backend="grouped_mm")
        grouped_gemm(xk, wk, offsets, backend="grouped_mm")
    assert calls == [], "an unsupported case must not reach torch._grouped_mm"
    logged = [r.getMessage() for r in caplog.records if r.name == "foldmesh.kernels"]
    assert len(logged) == 1, f"one message per distinct reason, got {logged}"
    assert fragment in logged[0] and "falls back to" in logged[0]
    assert_close(y, naive_grouped_gemm(x.double(), w.double(), [3, 0, 4]), dtype)


def test_torch_without_grouped_mm_falls_back(monkeypatch, caplog):
    monkeypatch.delattr(torch, "_grouped_mm")
    monkeypatch.setattr(_grouped_mm, "_logged", set())
    _, x, w, offsets = _inputs([3, 5], 0, 8, 8, torch.float32, seed=0)
    with caplog.at_level(logging.WARNING, logger="foldmesh.kernels"):
        y = grouped_gemm(on_device(x), on_device(w), offsets, backend="grouped_mm")
    assert "has no torch._grouped_mm" in caplog.text
    assert_close(y, naive_grouped_gemm(x.double(), w.double(), [3, 5]), torch.float32)


def test_bad_arguments_raise_instead_of_falling_back():
    x, w = on_device(torch.zeros(4, 8)), on_device(torch.zeros(2, 16, 8))
    with pytest.raises(ValueError, match="need x"):
        grouped_gemm(x, w, on_device(torch.tensor([1, 4])), backend="grouped_mm")
    with pytest.raises(TypeError, match="share a dtype"):
        grouped_gemm(x, w[:, :8].to(torch.bfloat16), on_device(torch.tensor([1, 4])),
                     backend="grouped_mm")  # fmt: skip


def _facts(**change) -> Facts:
    base = dict(device="cuda", capability=(9, 0), dtype=torch.bfloat16, n=4096, k=4096,
                m=14336, groups=8, aligned_pointers=True, has_op=True)  # fmt: skip
    return Facts(**{**base, **change})


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({}, None),
        (dict(capability=(10, 0)), None),
        (dict(capability=(8, 0)), "only on sm90/sm100 GPUs, this is sm80"),
        (dict(capability=(12, 0)), "this is sm120"),
        (dict(dtype=torch.float32), "only for bfloat16 on CUDA, got torch.float32"),
        (dict(dtype=torch.float16), "only for bfloat16 on CUDA"),
        (dict(groups=1024), "fewer than 1024 groups"),
        (dict(k=4100), "K = 4100 and M = 14336 must be multiples of 8"),
        (dict(n=2**31), "int32 offsets"),
        (dict(aligned_pointers=False), "16-byte boundary"),
        (dict(has_op=False), "has no torch._grouped_mm"),
        (dict(rocm=True), "not ROCm"),
        (dict(device="mps", capability=None), "not mps"),
        (dict(device="cpu", capability=None, dtype=torch.float16, groups=4096), None),
        (dict(device="cpu", capability=None, dtype=torch.float64), "float32, bfloat16 or float16"),
        (dict(device="cpu", capability=None, dtype=torch.float32, m=14338), "multiples of 4"),
    ],
)
def test_rules(change, fragment):
    """The CUDA rules too, without a GPU: each case names the rule that failed."""
    reason = rules(_facts(**change))
    assert (reason is None) if fragment is None else (fragment in reason), reason
