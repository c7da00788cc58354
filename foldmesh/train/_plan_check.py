"""The planner's step time against the measured one, once per launch (rank 0).

At the first logged step at or after a launch's 10th step, rank 0 asks the planner
(``foldmesh.plan.estimate``, the ``Workload`` and ``Layout`` that ``train --plan`` builds)
for this run's step time on this GPU, and logs one event::

    step time: measured 1.13 s, planner 0.165 s (ratio 6.89)

measured being the median of the launch's steps after its first three (compilation,
autotuning, the allocator's growth), profiled steps left out. When the two differ by more
than 25%, a second event names the largest term of the prediction, so that the kernel or
the collective to look at comes first. On a device without a planner preset (the CPU, an
unknown GPU) the first event says so instead. No collective: only rank 0 works, once;
the estimate itself takes milliseconds.
"""

from __future__ import annotations

import os
import statistics

import torch

AT_STEP = 10
WARMUP = 3
OFF_BY = 0.25


def device_preset(device: torch.device) -> str | None:
    """The planner's hardware preset of ``device`` (by its name, as ``peak_flops``), or
    None on CPU and unknown GPUs."""
    if device.type != "cuda":
        return None
    from ..plan._hardware import HARDWARE
    from .flops import _SAME_COMPUTE

    name = torch.cuda.get_device_name(device).upper()
    keys = {**{k.upper(): k for k in HARDWARE}, **_SAME_COMPUTE}
    return next((preset for key, preset in keys.items() if key in name), None)


class PlanCheck:
    """Collects a launch's step times (``step_done``) and compares their steady median with
    the planner's at the first logged step at or after the ``AT_STEP``-th (``logged``).

    Args:
        cfg: the run's ``TrainConfig``.
        world_size: the run's ranks.
        device: this rank's device (decides the preset and what ``dtype = "auto"`` means).
        log: the trainer's ``MetricsLogger`` (its events go to metrics.jsonl).
        enabled: False on ranks other than 0.
        hw: a ``foldmesh.plan.Hardware`` to use instead of the device's preset (tests).
    """

    def __init__(self, cfg, world_size: int, device: torch.device, log, enabled: bool = True,
                 hw=None):
        self.cfg, self.world_size, self.device, self.log = cfg, world_size, device, log
        self.enabled, self.hw = enabled, hw
        window = cfg.metrics.profile_steps
        self.profiled = range(window[0], window[1] + 1) if window else range(0)
        self.seconds: list[float | None] = []  # the launch's steps; None: profiled
        self.done = False

    def step_done(self, step: int, seconds: float) -> None:
        """Record optimizer step ``step`` (1-based) of ``seconds``. On a GPU a step's
        kernels may finish during the next one (only the loss is waited for); the median
        over many steps is the per-step rate all the same."""
        if self.enabled and not self.done:
            self.seconds.append(None if step in self.profiled else seconds)

    def logged(self, step: int) -> None:
        """At a logged step: compare once enough steps ran (see the module docstring)."""
        if not self.enabled or self.done or len(self.seconds) < AT_STEP:
            return
        steady = [s for s in self.seconds[WARMUP:] if s is not None]
        if not steady:  # every steady step so far was profiled: wait for one that is not
            return
        self.done = True
        measured = statistics.median(steady)
        for line in self.compare(measured):
            self.log.log_event(step, line)

    def compare(self, measured: float) -> list[str]:
        """The event lines for a measured steady step of ``measured`` seconds."""
        from ..plan import estimate, from_train_config, hardware, valid

        hw = self.hw
        if hw is None:
            preset = device_preset(self.device)
            if preset is None:
                where = (torch.cuda.get_device_name(self.device)
                         if self.device.type == "cuda" else self.device.type)
                return [f"step time: measured {measured:.3g} s; no planner preset for "
                        f"{where}, so no prediction to compare"]
            hw = hardware(preset)
        # ranks per node as launched (torchrun sets it), for which groups cross nodes
        local = int(os.environ.get("LOCAL_WORLD_SIZE", hw.gpus_per_node))
        hw = hw.replace(gpus_per_node=max(1, min(local, self.world_size)))
        try:
            workload, layout = from_train_config(self.cfg, self.world_size, self.device.type)
            why = valid(workload, layout)
            if why:
                return [f"step time: measured {measured:.3g} s; the planner cannot model "
                        f"this run: {why}"]
            e = estimate(workload, layout, hw)
        except Exception as err:  # a diagnostic: it must never stop a training run
            return [f"step time: measured {measured:.3g} s; the planner failed: "
                    f"{type(err).__name__}: {err}"]
        ratio = measured / e.step_time
        lines = [f"step time: measured {measured:.3g} s, planner {e.step_time:.3g} s "
                 f"(ratio {ratio:.2f})"]
        if abs(measured - e.step_time) > OFF_BY * e.step_time:
            name, seconds = e.largest_term()
            lines.append(f"step time: off by more than {OFF_BY:.0%} from the planner "
                         f"({hw.name}; {hw.describe_kernels()}); its largest term is {name}, "
                         f"{seconds:.3g} s of {e.step_time:.3g} s")
        return lines
