"""Profiler traces and CUDA memory snapshots of chosen optimizer steps.

    metrics.profile_steps = [10, 12]   ->  <run>/profile/rank<k>.json          (every rank)
    metrics.memory_snapshot = true     ->  <run>/profile/memory-rank<k>.pickle (CUDA only)

``torch.profiler.profile`` (CPU activity, plus CUDA when the run is on a GPU) starts before
step ``first`` and stops after step ``last``; each rank then writes its Chrome trace (open it
in https://ui.perfetto.dev or chrome://tracing). Every profiled step is a
``foldmesh step <n>`` range in the trace. A launch that ends inside the window
(``stop_after``) writes the trace of the steps it ran, one whose step raises writes none; a
resumed launch that starts inside the window profiles from its first step.

On CUDA, ``metrics.memory_snapshot`` records every allocation from the start of step
``first`` (``torch.cuda.memory._record_memory_history``) and dumps the snapshot after that
step, for https://pytorch.org/memory_viz. On CPU there is no CUDA allocator to record: the
setting is ignored without an error.

The profiler adds its own overhead: the steps in the window report lower tokens/s.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ._config_io import ConfigError
from .config import TrainConfig

PROFILE_DIR = "profile"
# allocation events kept by the memory history (the oldest are dropped beyond it)
_MEMORY_EVENTS = 100_000


def check_profile(cfg: TrainConfig) -> None:
    """Raise ``ConfigError`` unless ``metrics.profile_steps`` is empty or ``[first, last]``
    with ``1 <= first <= last <= training.steps``, and ``metrics.memory_snapshot`` has steps
    to snapshot."""
    m, steps = cfg.metrics, cfg.training.steps
    window = list(m.profile_steps)
    if not window:
        if m.memory_snapshot:
            raise ConfigError("metrics.memory_snapshot = true needs metrics.profile_steps: the "
                              "snapshot is taken at the first profiled step; set "
                              "metrics.profile_steps = [first, last]")
        return
    if len(window) != 2:
        raise ConfigError(f"metrics.profile_steps = {window} must be [first, last] (two "
                          "optimizer steps, 1-based, inclusive) or [] for no profiling")
    first, last = window
    if first < 1:
        raise ConfigError(f"metrics.profile_steps = {window}: first = {first} must be at "
                          "least 1 (steps count from 1)")
    if last < first:
        raise ConfigError(f"metrics.profile_steps = {window}: last = {last} is before "
                          f"first = {first}; write [first, last] with last >= first")
    if last > steps:
        raise ConfigError(f"metrics.profile_steps = {window}: last = {last} is past the run's "
                          f"last step (training.steps = {steps}); choose steps up to {steps}")


class StepProfiler:
    """Wraps each optimizer step (``with profiler.step(n, launch_last): ...``) and profiles
    the steps of ``cfg.metrics.profile_steps`` on this rank."""

    def __init__(self, cfg: TrainConfig, rank: int, device: torch.device):
        window = cfg.metrics.profile_steps
        self.first, self.last = (window[0], window[1]) if window else (0, -1)
        self.dir = Path(cfg.checkpoint.dir) / PROFILE_DIR
        self.rank, self.device = rank, device
        self.memory = cfg.metrics.memory_snapshot and device.type == "cuda"
        self._prof = None
        self._recording_memory = False

    def _start(self, step: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.start()
        if self.memory and step == self.first:
            torch.cuda.memory._record_memory_history(max_entries=_MEMORY_EVENTS)
            self._recording_memory = True

    def _dump_memory(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(self.dir / f"memory-rank{self.rank}.pickle"))
        torch.cuda.memory._record_memory_history(enabled=None)  # stop recording
        self._recording_memory = False

    def _stop(self, write: bool) -> None:
        prof, self._prof = self._prof, None
        prof.stop()
        if write:
            self.dir.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(self.dir / f"rank{self.rank}.json"))

    @contextlib.contextmanager
    def step(self, n: int, launch_last: int):
        """Run optimizer step ``n`` (1-based) inside the window's profiler; ``launch_last``:
        the last step this launch runs (the trace is written after it at the latest)."""
        inside = self.first <= n <= self.last
        if not inside:
            yield
            return
        if self._prof is None:
            self._start(n)
        try:
            with torch.profiler.record_function(f"foldmesh step {n}"):
                yield
        except BaseException:
            if self._recording_memory:
                torch.cuda.memory._record_memory_history(enabled=None)
                self._recording_memory = False
            self._stop(write=False)
            raise
        if self._recording_memory:
            # NOTE: host synchronisation: the snapshot waits for the step's kernels
            torch.cuda.synchronize(self.device)
            self._dump_memory()
        if n == self.last or n == launch_last:
            if self.device.type == "cuda":
                # NOTE: host synchronisation: the trace must hold the last step's kernels
                torch.cuda.synchronize(self.device)
            self._stop(write=True)
