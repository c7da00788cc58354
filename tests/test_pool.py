"""The rank pool: the same example on every rank, failures with the rank's traceback, and
hangs that time out instead of stalling the suite."""

import functools
import time

import pytest
import torch
import torch.distributed as dist

from foldmesh.testing import RankError, RankPool, RankTimeout


def rank_and_sum(x: int) -> tuple[int, int]:
    t = torch.tensor([x + dist.get_rank()])
    dist.all_reduce(t)
    return dist.get_rank(), int(t)


def fail_on_rank(bad: int) -> None:
    if dist.get_rank() == bad:
        raise ValueError(f"boom on rank {bad}")


def mismatched_collective() -> None:
    # rank 1 waits in a collective rank 0 never joins: gloo's timeout must end it
    if dist.get_rank() == 1:
        dist.all_reduce(torch.ones(1))


def sleep_forever() -> None:
    time.sleep(3600)


def test_runs_on_every_rank_and_is_reused():
    with RankPool(3, timeout=30) as pool:
        assert pool.run(rank_and_sum, 1) == [(0, 6), (1, 6), (2, 6)]
        assert pool.run(rank_and_sum, x=0) == [(0, 3), (1, 3), (2, 3)]


def test_failure_carries_the_rank_traceback_and_pool_recovers():
    with RankPool(2, timeout=30) as pool:
        with pytest.raises(RankError, match=r"(?s)--- rank 1 ---.*ValueError: boom on rank 1"):
            pool.run(fail_on_rank, 1)
        assert pool.run(rank_and_sum, 0) == [(0, 1), (1, 1)]


def test_collective_hang_fails_within_timeout():
    hang = r"(?s)--- rank 1 ---.*all_reduce"
    with RankPool(2, timeout=4) as pool:
        start = time.monotonic()  # the call only: start-up has its own bound
        with pytest.raises(RankError, match=hang):
            pool.run(mismatched_collective)
    assert time.monotonic() - start < 60


def test_startup_is_not_counted_against_the_call_timeout():
    """A slow start (a busy machine) must not fail a pool whose calls are quick: start-up has
    its own bound. Here every rank sleeps 3 s before joining, longer than the 2 s call
    timeout."""
    with RankPool(2, timeout=2, initializer=functools.partial(time.sleep, 3)) as pool:
        assert pool.run(rank_and_sum, 0) == [(0, 1), (1, 1)]


def test_silent_hang_times_out():
    with RankPool(2, timeout=3) as pool:
        with pytest.raises(RankTimeout, match=r"did not answer within 3s"):
            pool.run(sleep_forever)
        assert pool.run(rank_and_sum, 0) == [(0, 1), (1, 1)]


def test_the_pool_and_counter_import_without_hypothesis():
    """Only the fold strategies need hypothesis (the ``testing`` extra); the planner's dry run
    imports the counter on machines that may not have it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "from foldmesh.testing import CollectiveCounter, RankPool\n"
            "try:\n    from foldmesh.testing import folds\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "foldmesh.testing.folds needs hypothesis: pip install 'foldmesh[testing]'" in out.stdout
