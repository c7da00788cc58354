"""The pipeline schedules foldmesh runs (torch.distributed.pipelining's own) and their rules.

Each rule here is one that torch enforces when the schedule is built, or one without which
a schedule would deadlock; checking them up front gives an error that names the setting
before any process group or model exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.pipelining import schedules as _torch_schedules

from .._fold import FoldError


@dataclass(frozen=True)
class ScheduleInfo:
    """How a schedule places and counts its stages."""

    torch_name: str
    """The class in ``torch.distributed.pipelining.schedules``."""
    multi: bool
    """Several stages per rank (a list of stages) rather than exactly one."""
    style: str
    """Stage placement: "loop" (stage s on rank s % pp) or "v"."""
    min_microbatches: str
    """"none", "stages" (at least as many micro-batches as stages) or "rounds" (a multiple
    of max(1, n // pp), torch's interleaved rule)."""
    zero_bubble: bool = False
    """Splits backward into input- and weight-gradient steps."""


_ALL = {
    "GPipe": ScheduleInfo("ScheduleGPipe", False, "loop", "none"),
    "1F1B": ScheduleInfo("Schedule1F1B", False, "loop", "stages"),
    "Interleaved1F1B": ScheduleInfo("ScheduleInterleaved1F1B", True, "loop", "rounds"),
    "LoopedBFS": ScheduleInfo("ScheduleLoopedBFS", True, "loop", "none"),
    "InterleavedZeroBubble": ScheduleInfo("ScheduleInterleavedZeroBubble", True, "loop",
                                          "rounds", zero_bubble=True),
    "ZBVZeroBubble": ScheduleInfo("ScheduleZBVZeroBubble", True, "v", "none", zero_bubble=True),
    "DualPipeV": ScheduleInfo("ScheduleDualPipeV", True, "v", "stages", zero_bubble=True),
}

# Zero-bubble schedules compute weight gradients in a separate pass. Before torch 2.13 that
# pass summed the gradients of every output of a multi-output node into its first output
# (pytorch#170277; FSDP2 splits its all-gather into parameters exactly so) and counted a
# weight used twice in a row twice (pytorch#180952): silently wrong gradients. They are
# therefore offered only from torch 2.13 on.
_ZERO_BUBBLE_TORCH = (2, 13)
_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def _offered(info: ScheduleInfo) -> bool:
    if not hasattr(_torch_schedules, info.torch_name):
        return False
    return not info.zero_bubble or _TORCH >= _ZERO_BUBBLE_TORCH


SCHEDULES: dict[str, ScheduleInfo] = {
    name: info for name, info in _ALL.items() if _offered(info)}
"""The schedules foldmesh runs on the installed torch (zero-bubble ones from torch 2.13)."""


def _info(schedule: str) -> ScheduleInfo:
    if schedule not in SCHEDULES:
        missing = [n for n in _ALL if n not in SCHEDULES]
        note = (f" ({', '.join(missing)} need torch >= 2.13: older zero-bubble passes give "
                "wrong weight gradients)" if missing else "")
        raise FoldError(f"pp_schedule = {schedule!r} is not a pipeline schedule; choose one of "
                        f"{', '.join(SCHEDULES)}{note}")
    return SCHEDULES[schedule]


def schedule_style(schedule: str) -> str:
    return _info(schedule).style


def schedule_class(schedule: str):
    return getattr(_torch_schedules, _info(schedule).torch_name)


def check_pipeline(schedule: str, pp: int, stages_per_rank: int | None,
                   microbatches: int | None) -> int:
    """Check a schedule against pp, the stages per rank and the micro-batches per step (None:
    not known yet); return the stages per rank (its default when None: 1 for single-stage
    schedules, 2 for the others).

    Raises:
        FoldError: naming ``pp_schedule``, ``pp_stages_per_rank`` or the micro-batches.
    """
    info = _info(schedule)
    if stages_per_rank is None or stages_per_rank == 0:
        stages_per_rank = 2 if info.multi else 1
    if stages_per_rank < 1:
        raise FoldError(f"pp_stages_per_rank = {stages_per_rank} must be at least 1")
    if not info.multi and stages_per_rank != 1:
        multi = [n for n, i in SCHEDULES.items() if i.multi and i.style == "loop"]
        raise FoldError(f"pp_schedule = {schedule!r} runs one stage per rank, got "
                        f"pp_stages_per_rank = {stages_per_rank}; set it to 1 or use a "
                        f"multi-stage schedule ({', '.join(multi)})")
    if info.style == "v" and stages_per_rank != 2:
        raise FoldError(f"pp_schedule = {schedule!r} places stages in a V and needs exactly "
                        f"pp_stages_per_rank = 2, got {stages_per_rank}")
    if microbatches is not None:
        stages = pp * stages_per_rank
        if microbatches < 1:
            raise FoldError(f"a pipeline step needs at least one micro-batch, got {microbatches}")
        if info.min_microbatches == "stages" and microbatches < stages:
            raise FoldError(
                f"pp_schedule = {schedule!r} needs at least as many micro-batches per step as "
                f"stages ({stages} = pp {pp} x pp_stages_per_rank {stages_per_rank}), got "
                f"{microbatches}; use smaller micro-batches or a larger batch")
        if info.min_microbatches == "rounds":
            rounds = max(1, microbatches // pp)
            if microbatches % rounds:
                good = [m for m in range(1, 4 * pp + 1) if m % max(1, m // pp) == 0]
                raise FoldError(
                    f"pp_schedule = {schedule!r} runs micro-batches in rounds of pp = {pp} and "
                    f"needs their number to be a multiple of max(1, n // pp) = {rounds}, got "
                    f"{microbatches}; use e.g. {good[-8:]} micro-batches per step")
    return stages_per_rank
