"""The planner against MoE Parallel Folding's Table 3 (H100, 8 per node, batch 256 x 4096).

    python scripts/plan_paper.py [--search]

Prints docs/planner.md's comparison table: the paper's MFU for each configuration next to
the planner's prediction (MFU with Megatron's FLOPs formula, as the paper counts it), its
memory, and, with --search, the planner's own best layout per model (minutes per model).
"""

from __future__ import annotations

import argparse
import time

from foldmesh import Fold
from foldmesh.models import preset
from foldmesh.plan import Layout, Workload, estimate, hardware, search

# (model, GPUs, VPP the authors' model zoo uses, {column: (fold, paper MFU %)});
# configurations are the paper's CP/TP/EP/PP(/ETP); "MCore" has ETP = TP.
ROWS = [
    ("mixtral-8x22b", 128, 1, {
        "FSDP": (dict(), 4.3), "FSDP+EP": (dict(tp=2, ep=8), 23.4),
        "TP+EP+DP": (dict(tp=4, ep=8), 36.6),
        "MCore": (dict(tp=2, ep=4, pp=8, etp=2), 46.3),
        "MCore w/ Folding": (dict(tp=2, ep=8, pp=8, etp=1), 49.3)}),
    ("qwen2-57b-a14b", 64, 7, {
        "FSDP": (dict(tp=2), 9.9), "FSDP+EP": (dict(ep=8), 25.4),
        "TP+EP+DP": (dict(tp=4, ep=4), 23.1),
        "MCore": (dict(tp=2, ep=4, pp=4, etp=2), 35.3),
        "MCore w/ Folding": (dict(tp=2, ep=4, pp=4, etp=1), 39.0)}),
    ("mixtral-8x22b-g8t8", 128, 1, {
        "FSDP": (dict(tp=8), 2.2), "FSDP+EP": (dict(tp=4, ep=8), 9.0),
        "TP+EP+DP": (dict(tp=8, ep=8), 8.7),
        "MCore": (dict(tp=2, ep=8, pp=8, etp=2), 17.1),
        "MCore w/ Folding": (dict(tp=4, ep=8, pp=8, etp=1), 28.8)}),
    ("llama3-8x70b", 256, 1, {
        "FSDP+EP": (dict(tp=8, ep=8), 19.6),
        "MCore": (dict(tp=8, ep=4, pp=8, etp=8), 38.8),
        "MCore w/ Folding": (dict(tp=8, ep=8, pp=16, etp=1), 41.6)}),
]


def layout_of(fold: dict, gpus: int, vpp: int) -> Layout:
    f = Fold(**fold).resolve(gpus)
    v = vpp if f.pp > 1 else 1
    return Layout(f, micro_batch=1, schedule="Interleaved1F1B" if v > 1 else "1F1B",
                  stages_per_rank=v)


def rows(hw=None):
    """(model, column, fold, paper MFU %, Estimate) for every configuration above."""
    hw = hw or hardware("h100", kernels="megatron")
    for name, gpus, vpp, columns in ROWS:
        work = Workload(preset(name, capacity_factor=1.0), 256, 4096)
        for column, (fold, paper) in columns.items():
            yield name, column, layout_of(fold, gpus, vpp), paper, estimate(
                work, layout_of(fold, gpus, vpp), hw)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--search", action="store_true")
    args = p.parse_args()
    print("| model | configuration | fold (attention / MoE) | paper MFU | predicted MFU | "
          "ratio | memory GiB | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, column, layout, paper, e in rows():
        f = layout.fold
        print(f"| {name} | {column} | tp{f.tp} cp{f.cp} dp{f.dp} pp{f.pp} / etp{f.etp} "
              f"ep{f.ep} edp{f.edp} | {paper:.1f}% | {100 * e.mfu_megatron:.1f}% | "
              f"{e.mfu_megatron * 100 / paper:.2f} | {e.memory.total / 2**30:.0f} | "
              f"{e.step_time:.2f} |")
    if args.search:
        hw = hardware("h100", kernels="megatron")
        for name, gpus, _, _ in ROWS:
            t = time.time()
            work = Workload(preset(name, capacity_factor=1.0), 256, 4096)
            best = [e for e in search(work, gpus, hw, micro_batches=(1,)) if e.fits][:3]
            for e in best:
                lay = e.layout
                print(f"{name}: {lay.fold} mbs{lay.micro_batch} v{lay.stages_per_rank} "
                      f"{lay.activation_checkpoint} {lay.data_parallel}: MFU (Megatron) "
                      f"{100 * e.mfu_megatron:.1f}%, {e.memory.total / 2**30:.0f} GiB "
                      f"({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
