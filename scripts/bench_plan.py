"""How long the planner takes on this machine: the 1,024-rank dry run and a full search.

    python scripts/bench_plan.py

Prints a Markdown table for BENCHMARKS.md: the Mixtral-8x22B dry run (tp2 ep8 pp8 etp1 on
1,024 fake ranks, FSDP, bf16, one micro-batch) for the first and the last rank, with the
planner's byte check, and the search over every fold of Mixtral-8x22B on 128 H100s.
"""

from __future__ import annotations

import datetime
import os
import platform
import time

import torch

from foldmesh import Fold
from foldmesh.models import preset
from foldmesh.plan import (
    Layout,
    Workload,
    bytes_by,
    dry_run,
    hardware,
    search,
    step_collectives,
)


def main() -> None:
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| what | seconds | check |")
    print("|---|---|---|")
    model = preset("mixtral-8x22b")
    work = Workload(model, global_batch=1024, seq_len=4096)
    layout = Layout(Fold(tp=2, ep=8, pp=8, etp=1).resolve(1024))
    for rank in (0, 1023):
        t = time.perf_counter()
        r = dry_run(work, layout, rank)
        wall = time.perf_counter() - t
        planned = bytes_by(step_collectives(r.workload, layout, rank, microbatches=1,
                                            trainer=False, p2p=False), layout.fold)
        same = "bytes equal the planner's" if planned == r.collectives else "bytes DIFFER"
        print(f"| dry run, Mixtral-8x22B, rank {rank} of 1,024 | {wall:.1f} | {same} |")
    t = time.perf_counter()
    found = search(Workload(preset("mixtral-8x22b", capacity_factor=1.0), 256, 4096), 128,
                   hardware("h100"))
    print(f"| search, Mixtral-8x22B on 128 H100 ({len(found):,} layouts) | "
          f"{time.perf_counter() - t:.1f} | {sum(e.fits for e in found):,} fit |")


if __name__ == "__main__":
    main()
