"""The planner's outputs: a ranked text table, JSON, and a plot of MFU with the step time."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ._estimate import Estimate
from ._hardware import GIB

TIME_PARTS = ("compute", "tp", "cp", "ep", "etp", "dp", "edp", "pp", "bubble", "optimizer")


def _fold_text(e: Estimate) -> str:
    f, lay = e.layout.fold, e.layout
    attn = f"tp{f.tp} cp{f.cp} dp{f.dp} pp{f.pp}" + (f" v{lay.stages_per_rank}"
                                                     if lay.stages_per_rank > 1 else "")
    if lay.pp_layers:  # an explicit split, layers per stage
        attn += " [" + "+".join(map(str, lay.pp_layers)) + "]"
    return f"{attn} | etp{f.etp} ep{f.ep} edp{f.edp}"


def table(estimates: list[Estimate], top: int = 10) -> str:
    """The ``top`` fitting layouts, fastest first, then the best few that do not fit."""
    fit = [e for e in estimates if e.fits][:top]
    unfit = [e for e in estimates if not e.fits][:max(3, top // 3)]
    head = ("#", "attention | MoE", "mbs", "AC", "DP", "mem GiB", "step s", "tok/s/GPU",
            "MFU", "exposed comm s (cross-node*)", "bubble s")
    rows = [head]
    for i, e in enumerate(fit, 1):
        rows.append((str(i), _fold_text(e), str(e.layout.micro_batch),
                     e.layout.activation_checkpoint, e.layout.data_parallel,
                     f"{e.memory.total / GIB:.1f}", f"{e.step_time:.2f}",
                     f"{e.tokens_per_s_per_gpu:,.0f}", f"{100 * e.mfu:.1f}%",
                     _comm_text(e), f"{e.time.get('bubble', 0.0):.2f}"))
    for e in unfit:
        rows.append(("-", _fold_text(e), str(e.layout.micro_batch),
                     e.layout.activation_checkpoint, e.layout.data_parallel,
                     f"{e.memory.total / GIB:.1f}", "-", "-", "-",
                     f"does not fit: {e.limit}", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    if fit:
        best = fit[0]
        terms = ", ".join(f"{k} {v / GIB:.1f}" for k, v in best.memory.terms().items() if v)
        lines += ["", f"best layout's memory (GiB of {best.hardware.usable_bytes / GIB:.0f} "
                      f"usable on {best.hardware.name}): {terms}"]
        name, seconds = best.largest_term()
        lines.append(f"step time: {best.hardware.describe_kernels()}; the largest term is "
                     f"{name}, {seconds:.3g} s of {best.step_time:.3g} s")
    return "\n".join(lines)


def _comm_text(e: Estimate) -> str:
    crossing = {_cat(g) for g in e.cross_node}
    parts = [f"{k}{'*' if k in crossing else ''} {e.time[k]:.2f}"
             for k in ("tp", "cp", "ep", "etp", "dp", "edp", "pp") if e.time.get(k, 0) >= 5e-3]
    return ", ".join(parts) or "-"


def _cat(group: str) -> str:
    from ._estimate import CATEGORY

    return CATEGORY.get(group, group)


def write_json(estimates: list[Estimate], path: str | Path) -> None:
    """One object per layout (``Estimate.to_dict``), in the table's order."""
    data = [e.to_dict() for e in estimates]
    Path(path).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")


def plot(estimates: list[Estimate], path: str | Path, top: int = 15, title: str = "") -> None:
    """Predicted MFU per layout (left) and its step time split by part (right); ``title``
    names the model (default: its layer count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit = [e for e in estimates if e.fits and math.isfinite(e.step_time)][:top]
    if not fit:
        raise ValueError("no layout fits: nothing to plot")
    labels = [f"{_fold_text(e)}  mbs{e.layout.micro_batch} {e.layout.activation_checkpoint} "
              f"{e.layout.data_parallel}" for e in fit]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 0.45 * len(fit) + 2), sharey=True)
    y = range(len(fit))
    ax1.barh(y, [100 * e.mfu for e in fit], color="tab:blue")
    ax1.set_yticks(list(y), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("predicted MFU (%)")
    left = [0.0] * len(fit)
    for part in TIME_PARTS:
        vals = [e.time.get(part, 0.0) for e in fit]
        if any(vals):
            ax2.barh(y, vals, left=left, label=part)
            left = [a + b for a, b in zip(left, vals, strict=True)]
    ax2.set_xlabel("predicted step time (s)")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    e0 = fit[0]
    name = title or f"{e0.workload.model.num_layers}-layer model"
    fig.suptitle(f"{name} on {e0.layout.fold.world_size} x {e0.hardware.name}, batch "
                 f"{e0.workload.global_batch} x {e0.workload.seq_len}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
