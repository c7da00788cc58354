"""sort_chunks against slicing and concatenation, its round trip and its gradient."""

from __future__ import annotations

import pytest
import torch
from foldmesh.kernels import sort_chunks
from foldmesh.kernels._chunks import sort_chunks_ref
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_naive import BACKENDS, DEVICE, leaf, naive_sort_chunks, on_device


@st.composite
def chunk_layouts(draw):
    n_ranks, n_experts = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    max_size = draw(st.sampled_from([0, 1, 5]))
    sizes = draw(st.lists(st.integers(0, max_size), min_size=n_ranks * n_experts,
                          max_size=n_ranks * n_experts))  # fmt: skip
    return n_ranks, n_experts, sizes


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(
    layout=chunk_layouts(),
    hidden=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    inverse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sort_chunks_matches_naive(backend, layout, hidden, dtype, inverse, seed):
    n_ranks, n_experts, sizes = layout
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), hidden, generator=gen).to(dtype)
    split_sizes = on_device(torch.tensor(sizes, dtype=torch.int64))
    xk = leaf(x, device=DEVICE)
    out = sort_chunks(xk, split_sizes, n_ranks, n_experts, inverse, backend=backend)
    # A move is exact in every dtype.
    assert torch.equal(out.cpu(), naive_sort_chunks(x, sizes, n_ranks, n_experts, inverse))
    back = sort_chunks(out, split_sizes, n_ranks, n_experts, not inverse, backend=backend)
    assert torch.equal(back.cpu(), x)

    grad = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(on_device(grad))
    want = naive_sort_chunks(grad, sizes, n_ranks, n_experts, not inverse)
    assert torch.equal(xk.grad.cpu(), want)


def test_sort_chunks_small_example():
    # Two ranks, two experts: rows tagged (rank, expert).
    sizes = torch.tensor([1, 2, 0, 1], device=DEVICE)  # r0e0, r0e1, r1e0, r1e1
    x = torch.tensor([[0.0], [1.0], [1.0], [11.0]], device=DEVICE)
    out = sort_chunks(x, sizes, 2, 2)
    assert out.flatten().tolist() == [0.0, 1.0, 1.0, 11.0]  # e0: r0 | e1: r0, r0, r1
    sizes = torch.tensor([1, 1, 1, 1], device=DEVICE)
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]], device=DEVICE)
    assert sort_chunks(x, sizes, 2, 2).flatten().tolist() == [0.0, 10.0, 1.0, 11.0]


def test_sort_chunks_reference_gradcheck_and_no_sync():
    sizes = torch.tensor([2, 0, 3, 1, 1, 2], device=DEVICE)
    x = torch.randn(9, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sort_chunks_ref(x, sizes, 3, 2), (x,))
    meta = torch.empty(9, 3, device="meta")
    assert sort_chunks(meta, sizes.to("meta"), 3, 2).shape == (9, 3)
