"""Acceptance: the fold transition is the identity on values and gradients, and costs exactly
the collectives docs/placements.md lists (none for etp = 1; one all-gather forward and one
reduce-scatter backward over etp otherwise)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode

from foldmesh import Fold, FoldError, to_attn, to_moe
from foldmesh.testing import RankPool, assert_close_to_reference, folded_mesh, folds

WORLD = 8
ATTN = (Shard(0), Shard(1), Shard(1))
MOE_SHARDED = (Shard(0), Shard(0), Shard(0))
MOE_PARTIAL = (Shard(0), Shard(0), Partial())

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def pool():
    with RankPool(WORLD, timeout=120) as p:
        yield p


def attn_input(fm, B, S, H, seed):
    torch.manual_seed(seed)
    full = torch.randn(B, S, H, dtype=torch.float64)
    x = DTensor.from_local(_local_block(full, fm), fm.attn_stage, ATTN, run_check=False,
                           shape=full.shape, stride=full.stride())
    return full, x.detach().requires_grad_()


def _local_block(full, fm):
    """This rank's [b, s, H] block, from its coordinates (batch over dp, sequence over cp, tp)."""
    f = fm.fold
    b, s = full.shape[0] // f.dp, full.shape[1] // (f.cp * f.tp)
    d, c, t = fm.coordinate("dp"), fm.coordinate("cp"), fm.coordinate("tp")
    seq = c * f.tp + t
    return full[d * b:(d + 1) * b, seq * s:(seq + 1) * s].contiguous()


def rank_major_tokens(full, fold):
    """Reference MoE token order: stage ranks in order (tp fastest), each block flattened."""
    f = fold
    b, s = full.shape[0] // f.dp, full.shape[1] // (f.cp * f.tp)
    blocks = []
    for d in range(f.dp):
        for c in range(f.cp):
            for t in range(f.tp):
                seq = c * f.tp + t
                block = full[d * b:(d + 1) * b, seq * s:(seq + 1) * s]
                blocks.append(block.reshape(-1, *full.shape[2:]))
    return torch.cat(blocks) if blocks else full.reshape(-1, *full.shape[2:])


def check_round_trip(fold: Fold, B: int, S: int, H: int, seed: int, partial: bool) -> None:
    fm = folded_mesh(fold)
    full, x = attn_input(fm, B, S, H, seed)
    y = to_moe(x, fm)
    assert y.device_mesh == fm.moe_stage
    assert_close_to_reference(y, rank_major_tokens(full, fold), name="to_moe tokens")
    if partial:
        # experts with their FFN split over etp produce partial sums: simulate that
        etp = fold.etp
        local = y.to_local(grad_placements=MOE_PARTIAL)
        y = DTensor.from_local(local / etp, fm.moe_stage, MOE_PARTIAL, run_check=False,
                               shape=y.shape, stride=y.stride())
    z = to_attn(y, fm, like=x)
    assert z.placements == x.placements and z.shape == x.shape
    assert_close_to_reference(z, full, name="round trip")
    torch.manual_seed(seed + 1)
    g = torch.randn(B, S, H, dtype=torch.float64)
    (z.to_local() * _local_block(g, fm)).sum().backward()
    assert x.grad.placements == x.placements
    assert_close_to_reference(x.grad, g, name="round-trip gradient")


@SETTINGS
@given(
    fold=folds(WORLD),
    b=st.integers(0, 2),
    s=st.integers(0, 3),
    H=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    partial=st.booleans(),
)
def test_round_trip_is_identity(pool, fold, b, s, H, seed, partial):
    pool.run(check_round_trip, fold, b * fold.dp, s * fold.cp * fold.tp, H, seed, partial)


def check_comms(fold: Fold) -> None:
    fm = folded_mesh(fold)
    f = fold
    _, x = attn_input(fm, 2 * f.dp, 2 * f.cp * f.tp, 3, seed=0)
    with CommDebugMode() as fwd:
        y = to_moe(x, fm)
    local = y.to_local(grad_placements=MOE_PARTIAL)
    with CommDebugMode() as bwd:
        local.sum().backward()
    ag = torch.ops.c10d_functional.all_gather_into_tensor
    rs = torch.ops.c10d_functional.reduce_scatter_tensor
    if f.etp == 1:
        assert fwd.get_total_counts() == 0, fwd.get_comm_counts()
        assert bwd.get_total_counts() == 0, bwd.get_comm_counts()
    else:
        assert dict(fwd.get_comm_counts()) == {ag: 1}, fwd.get_comm_counts()
        assert dict(bwd.get_comm_counts()) == {rs: 1}, bwd.get_comm_counts()

    # the way back: Partial over etp -> one reduce-scatter forward, one all-gather backward
    y = to_moe(x.detach(), fm)
    leaf = y.to_local().detach().requires_grad_()
    placements = MOE_PARTIAL if f.etp > 1 else MOE_SHARDED
    p = DTensor.from_local(leaf, fm.moe_stage, placements, run_check=False,
                           shape=y.shape, stride=y.stride())
    with CommDebugMode() as fwd:
        z = to_attn(p, fm, like=x)
    with CommDebugMode() as bwd:
        z.to_local().sum().backward()
    if f.etp > 1:
        assert dict(fwd.get_comm_counts()) == {rs: 1}, fwd.get_comm_counts()
        assert dict(bwd.get_comm_counts()) == {ag: 1}, bwd.get_comm_counts()
    else:
        assert fwd.get_total_counts() == 0 and bwd.get_total_counts() == 0


@pytest.mark.parametrize(
    "fold",
    [
        Fold(tp=2, cp=2, dp=2, ep=8, etp=1, edp=1),
        Fold(tp=2, cp=2, dp=2, ep=4, etp=2, edp=1),
        Fold(tp=1, cp=2, dp=4, ep=2, etp=4, edp=1),
        Fold(tp=2, cp=1, dp=2, pp=2, ep=1, etp=2, edp=2),
    ],
    ids=str,
)
def test_transition_collectives(pool, fold):
    pool.run(check_comms, fold)


def check_rejections() -> None:
    fm = folded_mesh(Fold(tp=2, cp=2, dp=2, ep=4, etp=2, edp=1))

    def expect(msg, fn):
        with pytest.raises(FoldError, match=msg):
            fn()

    _, x = attn_input(fm, 4, 8, 3, seed=0)
    # uneven batch over dp: the ranks would hold different token counts
    xb = DTensor.from_local(torch.zeros(1, 2, 3), fm.attn_stage, ATTN, run_check=False,
                            shape=(3, 8, 3), stride=(24, 3, 1))
    expect(r"batch size 3 is not divisible by dp = 2", lambda: to_moe(xb, fm))
    xs = DTensor.from_local(torch.zeros(2, 2, 3), fm.attn_stage, ATTN, run_check=False,
                            shape=(4, 6, 3), stride=(18, 3, 1))
    expect(r"sequence length 6 is not divisible by cp\*tp = 2\*2 = 4", lambda: to_moe(xs, fm))
    # tp > 1 without sequence parallelism
    xr = x.redistribute(fm.attn_stage, (Shard(0), Shard(1), Replicate()))
    expect(r"sequence parallelism", lambda: to_moe(xr, fm))
    # wrong mesh
    expect(r"fm.attn_stage", lambda: to_moe(to_moe(x, fm), fm))
    expect(r"B\*S must equal", lambda: to_attn(to_moe(x, fm), fm, shape=(4, 4, 3)))


def test_transition_rejects_bad_layouts(pool):
    pool.run(check_rejections)
