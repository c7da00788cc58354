"""Hypothesis strategies for folds."""

from __future__ import annotations

from hypothesis import strategies as st

from .._fold import Fold


def factorizations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every ordered way to write ``n`` as a product of ``parts`` positive integers."""
    if parts == 1:
        return [(n,)]
    return [
        (d, *rest)
        for d in range(1, n + 1)
        if n % d == 0
        for rest in factorizations(n // d, parts - 1)
    ]


def all_folds(world_size: int, pp: tuple[int, ...] = (1, 2)) -> list[Fold]:
    """Every resolved fold of ``world_size`` ranks: all pp in ``pp`` that divide the world,
    times all splits of a stage into (tp, cp, dp) and into (etp, ep, edp)."""
    out = []
    for p in pp:
        if world_size % p:
            continue
        stage = world_size // p
        for tp, cp, dp in factorizations(stage, 3):
            for etp, ep, edp in factorizations(stage, 3):
                out.append(Fold(tp=tp, cp=cp, dp=dp, pp=p, etp=etp, ep=ep, edp=edp))
    return out


def folds(
    world_size: int,
    *,
    pp: tuple[int, ...] = (1, 2),
    max_tp: int | None = None,
    max_etp: int | None = None,
    max_ep: int | None = None,
) -> st.SearchStrategy[Fold]:
    """Resolved folds of ``world_size`` ranks, pp drawn from ``pp`` (those dividing the world).

    Draws include etp different from tp and ep spanning tp, cp and dp ranks. The ``max_*``
    bounds restrict degrees a test cannot handle (e.g. an FFN size that etp must divide).
    Shrinks towards pp = 1 and small degrees.
    """

    def ok(f: Fold) -> bool:
        return (
            (max_tp is None or f.tp <= max_tp)
            and (max_etp is None or f.etp <= max_etp)
            and (max_ep is None or f.ep <= max_ep)
        )

    candidates = [f for f in all_folds(world_size, pp) if ok(f)]
    if not candidates:
        raise ValueError(f"no fold of {world_size} ranks satisfies the bounds")
    return st.sampled_from(candidates)
