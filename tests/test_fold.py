"""Fold validation: every bad fold fails before any process group exists, with a message
that names the failing product and a fix."""

import pytest
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from foldmesh import Fold, FoldError
from foldmesh.testing import all_folds, factorizations, folds


def test_fold_error_is_value_error():
    assert issubclass(FoldError, ValueError)


def test_products_differ_names_both_and_fix():
    msg = (r"attention ranks per stage tp\*cp\*dp = 2\*2\*2 = 8 but MoE ranks per stage "
           r"etp\*ep\*edp = 2\*2\*1 = 4; set edp=2")
    with pytest.raises(FoldError, match=msg):
        Fold(tp=2, cp=2, dp=2, etp=2, ep=2, edp=1)


def test_products_differ_suggests_dp_when_edp_cannot_fix():
    with pytest.raises(FoldError, match=r"= 2 but MoE .* = 8; set dp=4"):
        Fold(tp=2, cp=1, dp=1, etp=1, ep=8, edp=1)


@pytest.mark.parametrize("field", ["tp", "cp", "dp", "pp", "etp", "ep", "edp"])
@pytest.mark.parametrize("value", [0, -2])
def test_non_positive_degree(field, value):
    with pytest.raises(FoldError, match=rf"Fold.{field} must be a positive integer.*got {value}"):
        Fold(**{field: value})


def test_non_int_degree():
    with pytest.raises(FoldError, match=r"Fold.tp must be an int, got 2.0"):
        Fold(tp=2.0)


def test_world_not_divisible():
    msg = (r"cannot infer dp: world size 6 is not divisible by pp\*tp\*cp = 1\*2\*2 = 4; "
           r"choose degrees whose product divides 6")
    with pytest.raises(FoldError, match=msg):
        Fold(tp=2, cp=2, ep=2).resolve(6)
    with pytest.raises(FoldError, match=r"cannot infer edp: world size 6 .* pp\*etp\*ep = 1\*1\*4"):
        Fold(ep=4).resolve(6)


def test_world_differs_from_fold():
    with pytest.raises(FoldError, match=r"covers pp\*tp\*cp\*dp = 1\*2\*2\*2 = 8 ranks but the "
                                        r"world has 16; launch 8 ranks"):
        Fold(tp=2, cp=2, dp=2, ep=8, edp=1).resolve(16)


def test_num_experts_not_divisible_by_ep():
    with pytest.raises(FoldError, match=r"num_experts = 6 is not divisible by ep = 4; choose ep "
                                        r"from \[1, 2, 3, 6\]"):
        Fold(ep=4).check_experts(6)
    Fold(ep=4).check_experts(8)


def test_ffn_not_divisible_by_etp():
    with pytest.raises(FoldError, match=r"expert FFN size = 10 is not divisible by etp = 4"):
        Fold(etp=4).check_expert_ffn(10)


def test_unresolved_fold_explains():
    with pytest.raises(FoldError, match=r"call fold.resolve\(world_size\) first"):
        _ = Fold(tp=2).world_size


def test_build_without_process_group():
    assert not dist.is_initialized()
    with pytest.raises(FoldError, match=r"no process group: launch with torchrun"):
        Fold().build("cpu")


def test_factorizations_are_complete():
    assert sorted(factorizations(8, 3)) == sorted(
        (a, b, c) for a in range(1, 9) for b in range(1, 9) for c in range(1, 9) if a * b * c == 8
    )
    assert len(all_folds(8)) == 10 * 10 + 6 * 6


@given(world=st.sampled_from([1, 2, 4, 8, 16]), data=st.data())
def test_strategy_draws_valid_folds(world, data):
    f = data.draw(folds(world))
    assert f.resolve(world) == f
    assert f.tp * f.cp * f.dp == f.etp * f.ep * f.edp == world // f.pp


@given(world=st.integers(1, 64), tp=st.integers(1, 8), cp=st.integers(1, 4),
       ep=st.integers(1, 8), etp=st.integers(1, 4), pp=st.integers(1, 4))
def test_resolve_either_fits_or_explains(world, tp, cp, ep, etp, pp):
    fold = Fold(tp=tp, cp=cp, ep=ep, etp=etp, pp=pp)
    fits = world % (pp * tp * cp) == 0 and world % (pp * ep * etp) == 0
    if fits:
        r = fold.resolve(world)
        assert r.world_size == world and r.stage_size * pp == world
    else:
        with pytest.raises(FoldError, match="cannot infer"):
            fold.resolve(world)
