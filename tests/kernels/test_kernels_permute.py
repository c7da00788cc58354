"""permute / unpermute against the naive loops, forward and backward, on both backends.

Inputs are drawn on the CPU and the kernels run on ``DEVICE`` (see kernels_naive). The Triton
backend runs through the interpreter on CPU, which costs about a millisecond per program (one
per row), so its shapes are kept smaller than the torch backend's.
"""

from __future__ import annotations

import pytest
import torch
from foldmesh.kernels import capacity_for, permute, unpermute
from foldmesh.kernels._permute_ref import permute_ref, unpermute_ref
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_naive import (
    BACKENDS,
    DEVICE,
    assert_close,
    leaf,
    naive_permute,
    naive_unpermute,
    on_device,
    random_routing,
)

MAX_TOKENS = {"torch": 300, "triton": 40}
DTYPES = [torch.float32, torch.bfloat16]


@st.composite
def cases(draw, max_tokens: int):
    n_experts = draw(st.integers(1, 64))
    return dict(
        n_tokens=draw(st.integers(0, max_tokens)),
        hidden=draw(st.integers(1, 70)),
        n_experts=n_experts,
        topk=draw(st.integers(1, min(8, n_experts))),
        mode=draw(st.sampled_from(["uniform", "subset", "one"])),
        ties=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**16)),
        # None: dropless; a float: capacity factor; "pad": capacity factor 1 with padding.
        dropping=draw(st.sampled_from([None, None, 0.5, 1.25, "pad"])),
        policy=draw(st.sampled_from(["probs", "position"])),
    )


def _inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    idx, probs = random_routing(
        gen, case["n_tokens"], case["n_experts"], case["topk"], case["mode"], case["ties"]
    )
    x = torch.randn(case["n_tokens"], case["hidden"], generator=gen).to(case["dtype"])
    capacity, pad = None, case["dropping"] == "pad"
    if case["dropping"] is not None:
        factor = 1.0 if pad else case["dropping"]
        capacity = capacity_for(case["n_tokens"], case["n_experts"], case["topk"], factor)
    return gen, x, idx, probs, capacity, pad


def _backward(outputs, grads):
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def _check_against_naive(backend, case):
    gen, x, idx, probs, capacity, pad = _inputs(case)
    dtype, n_experts = case["dtype"], case["n_experts"]
    xk, pk = leaf(x, device=DEVICE), leaf(probs, device=DEVICE)
    perm = permute(xk, on_device(idx), pk, n_experts, capacity, case["policy"], pad,
                   backend=backend)  # fmt: skip
    x64, p64 = leaf(x, torch.float64), leaf(probs, torch.float64)
    tokens, row_probs, counts, row_map = naive_permute(
        x64, idx, p64, n_experts, capacity, case["policy"], pad
    )

    assert perm.tokens.dtype == dtype and perm.counts.dtype == torch.int64
    assert torch.equal(perm.tokens.to("cpu", torch.float64), tokens.detach())
    assert torch.equal(perm.probs.to("cpu", torch.float64), row_probs.detach())
    assert perm.counts.tolist() == counts
    assert perm.row_map.tolist() == row_map
    assert torch.equal(perm.offsets, torch.cumsum(perm.counts, 0))
    if capacity is not None:
        assert all(c <= capacity for c in counts)
        assert not pad or all(c == capacity for c in counts)

    y = torch.randn(perm.tokens.shape, generator=gen).to(dtype)
    yk, y64 = leaf(y, device=DEVICE), leaf(y, torch.float64)
    out = unpermute(yk, perm, pk, backend=backend)
    expected = naive_unpermute(y64, row_map, p64)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)

    outputs = (perm.tokens, perm.probs, out)
    grads = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in outputs]
    _backward(outputs, [on_device(g) for g in grads])
    _backward((tokens, row_probs, expected), [g.double() for g in grads])
    for actual, ref in ((xk, x64), (pk, p64), (yk, y64)):
        want = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        got = actual.grad if actual.grad is not None else torch.zeros_like(actual)
        assert_close(got, want, dtype)

    # Unweighted combine (the layer applied the weights already): forward and grad of y.
    yk, y64 = leaf(y, device=DEVICE), leaf(y, torch.float64)
    out = unpermute(yk, perm, backend=backend)
    expected = naive_unpermute(y64, row_map)
    assert_close(out, expected, dtype)
    _backward([out], [on_device(grads[2])])
    _backward([expected], [grads[2].double()])
    want = y64.grad if y64.grad is not None else torch.zeros_like(y64)
    assert_close(yk.grad if yk.grad is not None else torch.zeros_like(yk), want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_unpermute_match_naive(backend):
    @settings(max_examples=25, deadline=None)
    @given(case=cases(MAX_TOKENS[backend]))
    def check(case):
        _check_against_naive(backend, case)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_shapes(backend, dtype):
    """T = 0; one expert; k = E = 8; all tokens on one expert with capacity drops; a large T."""
    base = dict(hidden=33, ties=True, seed=3, dtype=dtype, policy="probs")
    shapes = [
        dict(n_tokens=0, n_experts=4, topk=2, mode="uniform", dropping=None),
        dict(n_tokens=0, n_experts=4, topk=2, mode="uniform", dropping="pad"),
        dict(n_tokens=9, n_experts=1, topk=1, mode="uniform", dropping=None),
        dict(n_tokens=9, n_experts=8, topk=8, mode="uniform", dropping=0.5),
        dict(n_tokens=12, n_experts=6, topk=2, mode="one", dropping="pad"),
        dict(n_tokens=256, n_experts=16, topk=2, mode="subset", dropping=None),
    ]
    for shape in shapes:
        _check_against_naive(backend, {**base, **shape})


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8, deadline=None)
@given(case=cases(32))
def test_unpermute_of_permute_with_mean_weights_is_identity(backend, case):
    _, x, idx, _, _, _ = _inputs(case)
    dtype = case["dtype"]
    weights = on_device(torch.full(idx.shape, 1.0 / idx.shape[1]))
    perm = permute(on_device(x), on_device(idx), weights, case["n_experts"], backend=backend)
    assert perm.tokens.shape[0] == idx.numel()
    assert_close(unpermute(perm.tokens, perm, weights, backend=backend), x.double(), dtype)


@settings(max_examples=25, deadline=None)
@given(case=cases(200))
def test_padding_does_not_change_the_result(case):
    """Padded and unpadded dropping keep the same copies and combine to the same output."""
    _, x, idx, probs, _, _ = _inputs(case)
    x, idx, probs = on_device(x), on_device(idx), on_device(probs)
    capacity = capacity_for(case["n_tokens"], case["n_experts"], case["topk"], 1.0)
    kept = permute_ref(x, idx, probs, case["n_experts"], capacity, case["policy"])
    padded = permute_ref(x, idx, probs, case["n_experts"], capacity, case["policy"], True)
    assert padded.tokens.shape[0] == case["n_experts"] * capacity
    assert torch.equal(padded.counts, torch.full_like(padded.counts, capacity))
    pad_rows = padded.row_copy < 0
    assert int(pad_rows.sum()) == padded.tokens.shape[0] - kept.tokens.shape[0]
    assert not padded.tokens[pad_rows].any() and not padded.probs[pad_rows].any()
    assert torch.equal(kept.row_map >= 0, padded.row_map >= 0)
    torch.testing.assert_close(
        unpermute_ref(padded.tokens * 3, padded, probs), unpermute_ref(kept.tokens * 3, kept, probs)
    )


def test_drop_by_probability_breaks_ties_by_token_index():
    idx = torch.zeros(5, 1, dtype=torch.int64, device=DEVICE)
    probs = torch.tensor([[0.5], [0.9], [0.5], [0.9], [0.5]], device=DEVICE)
    x = torch.arange(5.0, device=DEVICE).unsqueeze(1)
    by_prob = permute_ref(x, idx, probs, 1, capacity=3, drop_policy="probs")
    assert by_prob.tokens.flatten().tolist() == [0.0, 1.0, 3.0]  # token order, not prob order
    by_position = permute_ref(x, idx, probs, 1, capacity=3, drop_policy="position")
    assert by_position.tokens.flatten().tolist() == [0.0, 1.0, 2.0]
    assert by_prob.row_map.flatten().tolist() == [0, 1, -1, 2, -1]


@pytest.mark.parametrize("dropping", [None, "drop", "pad"])
def test_reference_gradcheck(dropping):
    gen = torch.Generator().manual_seed(0)
    idx, probs = random_routing(gen, 7, 4, 2, "one", ties=False)
    idx = on_device(idx)
    capacity = None if dropping is None else 3
    pad = dropping == "pad"
    x = leaf(torch.randn(7, 5, generator=gen, dtype=torch.float64), device=DEVICE)
    probs = leaf(probs, torch.float64, DEVICE)
    perm = permute_ref(x, idx, probs, 4, capacity, pad_to_capacity=pad)
    y = leaf(torch.randn(perm.tokens.shape, generator=gen, dtype=torch.float64), device=DEVICE)

    def through_both(x, probs, y):
        perm = permute_ref(x, idx, probs, 4, capacity, pad_to_capacity=pad)
        return perm.tokens, perm.probs, unpermute_ref(y, perm, probs)

    assert torch.autograd.gradcheck(through_both, (x, probs, y))
    assert torch.autograd.gradcheck(lambda y: unpermute_ref(y, perm), (y,))


@pytest.mark.parametrize("dropping", [None, "pad"])
def test_reference_needs_no_host_sync(dropping):
    """On the meta device any read of a value on the host raises: these paths never read one."""
    idx = torch.empty(64, 4, dtype=torch.int64, device="meta")
    probs = torch.empty(64, 4, device="meta")
    x = torch.empty(64, 32, device="meta")
    capacity = None if dropping is None else 40
    perm = permute(x, idx, probs, 8, capacity, pad_to_capacity=dropping == "pad")
    out = unpermute(perm.tokens, perm, probs)
    assert out.shape == (64, 32) and perm.counts.shape == (8,)
    with pytest.raises((RuntimeError, NotImplementedError)):
        permute(x, idx, probs, 8, capacity=40)  # dropping without padding must read N


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_known_kept_rows_gives_the_same_permutation(backend, policy):
    # A caller that already knows sum(min(count_e, C)) on the host skips the sync.
    torch.manual_seed(0)
    T, k, E, H = 13, 2, 4, 5
    x = on_device(torch.randn(T, H))
    idx = on_device(torch.stack([torch.randperm(E)[:k] for _ in range(T)]))
    probs = on_device(torch.rand(T, k))
    cap = 4
    counts = torch.zeros(E, dtype=torch.int64, device=DEVICE).scatter_add_(
        0, idx.reshape(-1), torch.ones(T * k, dtype=torch.int64, device=DEVICE))
    kept = int(counts.clamp(max=cap).sum())
    a = permute(x, idx, probs, E, capacity=cap, drop_policy=policy, backend=backend)
    b = permute(x, idx, probs, E, capacity=cap, drop_policy=policy, backend=backend,
                kept_rows=kept)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.row_map, b.row_map)
    assert a.tokens.shape[0] == kept
