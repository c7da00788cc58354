"""Property-testing kit: run sharded code on gloo ranks and compare it with references.

    from foldmesh.testing import RankPool, folds, assert_close_to_reference

    @pytest.fixture(scope="module")
    def pool():
        with RankPool(8) as p:
            yield p

    @given(fold=folds(8), seed=st.integers(0, 2**16))
    def test_mine(pool, fold, seed):
        pool.run(check_mine, fold, seed)    # check_mine: a module-level function

Hypothesis draws in the test process; every rank runs the same example.
``CollectiveCounter(fm)`` records every collective of a block (kind, fold axis, bytes,
forward or backward) for checks against what a layer's docs promise.
"""

from ._comm import CollectiveCounter, CollectiveRecord
from ._compare import TOLERANCES, assert_close_to_reference, full, load_reference
from ._order import group_sequences, order_mismatches
from ._pool import RankError, RankPool, RankTimeout, folded_mesh

# The fold strategies need hypothesis (the ``testing`` extra); the rank pool and the
# collective counter do not (the planner's dry run uses the counter), so the strategies are
# imported when first asked for.
_STRATEGIES = ("all_folds", "factorizations", "folds")


def __getattr__(name: str):
    if name in _STRATEGIES:
        try:
            from . import _strategies
        except ImportError as e:
            raise ImportError(f"foldmesh.testing.{name} needs hypothesis: pip install "
                              f"'foldmesh[testing]' (or hypothesis>=6.100)") from e
        return getattr(_strategies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "TOLERANCES",
    "CollectiveCounter",
    "CollectiveRecord",
    "RankError",
    "RankPool",
    "RankTimeout",
    "all_folds",
    "assert_close_to_reference",
    "factorizations",
    "folded_mesh",
    "folds",
    "full",
    "group_sequences",
    "load_reference",
    "order_mismatches",
]
