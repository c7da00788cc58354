"""A pool of gloo ranks that lives for a whole test module.

Starting W processes and a process group costs seconds; a hypothesis test runs dozens of
examples. ``RankPool`` starts the ranks once and runs each example on all of them:

    pool = RankPool(8)                      # once per module (see the pytest fixture below)
    results = pool.run(check_fold, fold, seed)   # every rank runs check_fold(fold, seed)

The example is drawn in the test process and sent to every rank, so all ranks run the same
example. ``fn`` must be importable by name (a module-level function). A failure on any rank
raises :class:`RankError` carrying each failed rank's traceback; a rank that does not answer
within ``timeout`` seconds raises :class:`RankTimeout`. Either way the pool is restarted before
the next call, because a failed collective leaves the process group unusable.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any


class RankError(AssertionError):
    """One or more ranks raised; the message holds every failed rank's traceback."""


class RankTimeout(RankError):
    """A rank did not answer in time (a hang, e.g. mismatched collectives)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, timeout: float, conn,
            initializer: Callable[[], Any] | None = None) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        if initializer is not None:
            initializer()
        # The collective timeout makes a rank stuck in a collective raise instead of hanging;
        # it is shorter than the call's so that the rank can still report its traceback.
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=0.8 * timeout),
        )
        conn.send_bytes(pickle.dumps(("ready", None)))
    except Exception:
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        return
    while True:
        try:
            msg = conn.recv_bytes()
        except EOFError:
            break
        fn, args, kwargs = pickle.loads(msg)
        if fn is None:
            break
        try:
            reply = ("ok", fn(*args, **kwargs))
        except BaseException:
            reply = ("error", traceback.format_exc())
        conn.send_bytes(pickle.dumps(reply))
    # what the calls built (models, FSDP state) holds process groups in reference cycles:
    # free them while the interpreter is whole (see foldmesh.train.__main__)
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


class RankPool:
    """``world_size`` gloo ranks, started once and reused for many calls.

    Args:
        world_size: number of ranks.
        timeout: seconds a call may take before it fails; each collective inside it fails
            after ``0.8 * timeout``, so a rank stuck in one reports where it was.
        startup_timeout: seconds the ranks may take to start (spawn, import torch, join the
            process group), counted apart from any call: on a machine busy with other work
            start-up can take far longer than a call, and a hang timeout must not depend on it.
        initializer: a picklable callable each rank runs before joining the process group
            (environment variables, seeds).
    """

    def __init__(self, world_size: int, timeout: float = 60.0, startup_timeout: float = 600.0,
                 initializer: Callable[[], Any] | None = None):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.initializer = initializer
        self._procs: list[mp.Process] = []
        self._conns: list = []
        self._start()

    def _start(self) -> None:
        # forkserver with torch preloaded: each rank starts in well under a second instead of
        # re-importing torch, and no rank inherits the test process' threads.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        port = _free_port()
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_worker,
                args=(rank, self.world_size, port, self.timeout, child, self.initializer),
                daemon=True,
            )
            p.start()
            child.close()
            self._procs.append(p)
            self._conns.append(parent)
        self._collect(self.startup_timeout, what="start-up")

    def _collect(self, timeout: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout
        replies: dict[int, tuple[str, Any]] = {}
        for rank, conn in enumerate(self._conns):
            remaining = max(0.0, deadline - time.monotonic())
            try:
                if conn.poll(remaining):
                    replies[rank] = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                replies[rank] = ("error", f"rank {rank} exited (exit code "
                                          f"{self._procs[rank].exitcode})")
        failed = {r: v for r, (k, v) in replies.items() if k == "error"}
        missing = [r for r in range(self.world_size) if r not in replies]
        if failed or missing:
            self.close(force=True)
            parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items())]
            if missing:
                parts.append(f"ranks {missing} did not answer within {timeout:.0f}s ({what})")
            err = RankTimeout if missing and not failed else RankError
            raise err(f"{what} failed on {len(failed) + len(missing)} of {self.world_size} "
                      "ranks:\n" + "\n".join(parts))
        return [replies[r][1] for r in range(self.world_size)]

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results in rank order.

        Raises:
            RankError: a rank raised (its traceback is in the message).
            RankTimeout: a rank did not answer within ``timeout`` seconds.
        """
        if not self._procs:
            self._start()
        msg = pickle.dumps((fn, args, kwargs))
        for conn in self._conns:
            conn.send_bytes(msg)
        return self._collect(self.timeout, what=getattr(fn, "__name__", "call"))

    def close(self, force: bool = False) -> None:
        """Stop every rank: ask them to leave, or kill them when ``force`` (after a failure)."""
        for conn in [] if force else self._conns:
            try:
                conn.send_bytes(pickle.dumps((None, (), {})))
            except (OSError, BrokenPipeError):
                pass
        for p in self._procs:
            p.join(timeout=0 if force else 10)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_MESHES: dict = {}


def folded_mesh(fold, device_type: str = "cpu"):
    """Inside a rank: the folded mesh of ``fold``, built once per process and then reused.

    Building creates process groups, a collective step; reusing meshes across hypothesis
    examples keeps a test from creating thousands of groups. Meshes are never destroyed here:
    DTensor caches layouts per mesh, and a cached layout may outlive a destroyed mesh. Every
    rank runs the same examples in the same order, so every rank builds the same meshes in
    the same order.
    """
    key = (fold, device_type)
    if key not in _MESHES:
        _MESHES[key] = fold.build(device_type)
    return _MESHES[key]
