"""The same collectives in the same order on every rank of a group: the check that rules out
the hang class of mismatched collectives.

A collective completes only when every rank of its process group issues it; if two ranks of
one group issue their collectives in different orders (or one rank skips one), the group
hangs or, worse, pairs up the wrong tensors. Both anchor projects' trackers are full of such
hangs (overlapped schedules, conditional auxiliary losses, uneven pipeline stages). So:

    counter = CollectiveCounter(fm)
    with counter:
        train_step()
    seq = group_sequences(counter)                       # on every rank
    assert not order_mismatches(all_ranks_seq)           # gathered from every rank

``group_sequences`` keys a rank's records by the group's global ranks (names differ between
fold views; ranks do not). ``order_mismatches`` then asks, for every group, that its members
issued the same sequence of (kind, bytes) collectives, and, for point-to-point traffic in a
group of two, that each rank's sends are the other's receives, in order and size. Byte
counts are per rank (``CollectiveCounter``'s convention), so a dropless all-to-all's
uneven splits legitimately differ between ranks: compare such runs with static routing
(``pad_to_capacity``), or pass ``bytes=False``.
"""

from __future__ import annotations

from collections import defaultdict

from ._comm import CollectiveCounter

__all__ = ["group_sequences", "order_mismatches"]

P2P = ("send", "recv")


def group_sequences(counter: CollectiveCounter) -> dict[tuple[int, ...], list[tuple[str, int]]]:
    """This rank's ``(kind, bytes)`` collectives per group (keyed by its global ranks), in
    the order it issued them."""
    out: dict[tuple[int, ...], list[tuple[str, int]]] = defaultdict(list)
    for r in counter.records:
        if not r.ranks:
            raise ValueError("a record without its group's ranks: use the CollectiveCounter "
                             "of this foldmesh version")
        out[r.ranks].append((r.kind, r.bytes))
    return dict(out)


def _first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"call {i}: {x} vs {y}"
    return f"{len(a)} vs {len(b)} calls"


def order_mismatches(per_rank: list[dict[tuple[int, ...], list[tuple[str, int]]]],
                     bytes: bool = True) -> list[str]:
    """Every way in which the ranks' sequences disagree (empty when they all agree).

    Args:
        per_rank: ``group_sequences`` of every rank, indexed by global rank.
        bytes: compare byte counts too (False: kinds only).
    """
    problems = []
    groups = {g for seqs in per_rank for g in seqs}
    for group in sorted(groups):
        def seq(rank, p2p, group=group):
            calls = per_rank[rank].get(group, [])
            return [(k, n if bytes else 0) for k, n in calls if (k in P2P) == p2p]

        first = group[0]
        for rank in group[1:]:
            if seq(rank, False) != seq(first, False):
                problems.append(f"group {group}: rank {rank} differs from rank {first} "
                                f"({_first_difference(seq(first, False), seq(rank, False))})")
        if len(group) == 2:
            a, b = group
            for src, dst in ((a, b), (b, a)):
                sent = [n for k, n in seq(src, True) if k == "send"]
                got = [n for k, n in seq(dst, True) if k == "recv"]
                if sent != got:
                    problems.append(f"group {group}: rank {src}'s sends are not rank {dst}'s "
                                    f"receives ({_first_difference(sent, got)})")
    return problems
