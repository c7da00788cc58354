"""Acceptance: the rank groups of both views follow the paper's rank-generation rule.

The rule is written here independently of foldmesh: a rank's coordinates are its mixed-radix
digits, tp (resp. etp) fastest and pp outermost, and a group of an axis is every rank that
agrees with it on all other digits.
"""

import itertools

import pytest
import torch.distributed as dist

from foldmesh import FoldedMesh
from foldmesh._mesh import _NOOP_TORCH, _TORCH
from foldmesh.testing import RankPool, all_folds

ATTN = ("pp", "dp", "cp", "tp")  # slowest to fastest
MOE = ("pp", "edp", "ep", "etp")


def rule_groups(sizes: dict[str, int], order: tuple[str, ...], axis: str) -> set[tuple[int, ...]]:
    """Groups of ``axis``: ranks sharing every other coordinate, listed in axis order."""
    strides, acc = {}, 1
    for name in reversed(order):
        strides[name] = acc
        acc *= sizes[name]
    others = [n for n in order if n != axis]
    groups = set()
    for coords in itertools.product(*(range(sizes[n]) for n in others)):
        base = sum(c * strides[n] for c, n in zip(coords, others, strict=True))
        groups.add(tuple(base + i * strides[axis] for i in range(sizes[axis])))
    return groups


def my_group(mesh) -> tuple[int, ...]:
    return tuple(mesh.mesh.flatten().tolist())


def check_all_folds(world: int) -> int:
    """On every rank, build each fold of ``world`` ranks and compare its groups with the rule."""
    rank = dist.get_rank()
    checked = 0
    for fold in all_folds(world):
        fm: FoldedMesh = fold.build("cpu")
        sizes = {a: fold.size(a) for a in ATTN + MOE}
        for order in (ATTN, MOE):
            for axis in order:
                groups = rule_groups(sizes, order, axis)
                mine = my_group(fm[axis])
                assert mine in groups, f"{fold}: {axis} group {mine} not in rule {groups}"
                assert rank in mine
                # the process group really spans those ranks (size-1 axes use a no-op group)
                assert fm[axis].size() == len(mine) == fold.size(axis)
                group = fm[axis].get_group()
                if len(mine) > 1:
                    assert dist.get_process_group_ranks(group) == list(mine)
                else:
                    # size-1 axes never communicate: from torch 2.13 on no gloo group is
                    # created for them; before it a single-rank one is (foldmesh._mesh: why)
                    want = "fake" if _TORCH >= _NOOP_TORCH else "gloo"
                    assert group.size() == 1 and dist.get_backend(group) == want
                assert set(map(tuple, fm.groups(axis))) == groups
        # pp groups agree between the views
        assert my_group(fm.attn["pp"]) == my_group(fm.moe["pp"])
        # flattened groups are unions of the rule's coordinates
        for name, axes, order in (("dp_cp", ("dp", "cp"), ATTN), ("ep_etp", ("ep", "etp"), MOE),
                                  ("cp_tp", ("cp", "tp"), ATTN),
                                  ("dp_cp_tp", ("dp", "cp", "tp"), ATTN)):
            expect = sorted(
                r for r in range(world)
                if all(_coord(r, sizes, order, a) == _coord(rank, sizes, order, a)
                       for a in order if a not in axes)
            )
            assert sorted(my_group(fm[name])) == expect, (fold, name)
        fm.destroy()
        checked += 1
    return checked


def _coord(rank: int, sizes, order, axis) -> int:
    stride = 1
    for name in reversed(order):
        if name == axis:
            return (rank // stride) % sizes[name]
        stride *= sizes[name]
    raise KeyError(axis)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_groups_follow_rank_rule(world):
    with RankPool(world, timeout=240) as pool:
        counts = pool.run(check_all_folds, world)
    assert counts == [len(all_folds(world))] * world


def test_rule_matches_paper_examples():
    # The 8-rank example: TP2 CP2 DP2 / ETP2 EP2 EDP2.
    s = dict(pp=1, dp=2, cp=2, tp=2, edp=2, ep=2, etp=2)
    assert rule_groups(s, MOE, "ep") == {(0, 2), (1, 3), (4, 6), (5, 7)}
    assert rule_groups(s, MOE, "etp") == rule_groups(s, ATTN, "tp")
    s.update(edp=1, ep=8, etp=1)
    assert rule_groups(s, MOE, "ep") == {tuple(range(8))}
