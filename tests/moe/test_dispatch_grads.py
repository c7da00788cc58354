"""Gradients into the dispatchers' autograd collectives are contiguous.

Before torch 2.13 the backward of the autograd all-gather and reduce-scatter fails on a
strided incoming gradient (``y.sum()`` hands back expanded ones); the dispatchers' wrappers
make it contiguous first. The GPU image runs torch 2.11, where the second test fails without
the wrappers; the first fails on any torch.
"""

import pytest
import torch

from foldmesh.moe._dispatch import _contiguous_grad, all_gather_autograd, reduce_scatter_autograd
from foldmesh.testing import RankPool


def test_contiguous_grad_hands_on_a_contiguous_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    y = x * 2
    _contiguous_grad(y)
    seen = []
    y.register_hook(lambda g: seen.append(g.is_contiguous()))  # runs after the guard's hook
    y.sum().backward()  # sum's gradient: ones expanded, stride 0
    assert seen == [True]
    assert torch.equal(x.grad, torch.full((3, 4), 2.0))
    assert _contiguous_grad(torch.ones(2)).grad_fn is None  # no graph, no hook


@pytest.fixture(scope="module")
def pool():
    with RankPool(2, timeout=60) as p:
        yield p


def _strided_gradients():
    import torch.distributed as dist
    group = dist.group.WORLD
    w = dist.get_world_size()
    x = torch.arange(8.0).reshape(4, 2).requires_grad_()
    all_gather_autograd(x, 0, group).sum().backward()
    gathered = x.grad.clone()  # d/dx of the sum over every rank's gathered copy: w
    x.grad = None
    reduce_scatter_autograd(x, "sum", 0, group).sum().backward()
    return gathered.tolist(), x.grad.tolist(), w


def test_collective_backward_takes_strided_gradients(pool):
    for gathered, scattered, w in pool.run(_strided_gradients):
        assert gathered == [[float(w)] * 2] * 4
        assert scattered == [[1.0] * 2] * 4
