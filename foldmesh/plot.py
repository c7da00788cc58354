"""Plot a run's metrics.jsonl as PNGs: loss, throughput, expert load.

    python -m foldmesh.plot RUN_DIR [--out DIR]

writes into DIR (default RUN_DIR):

- ``loss.png``: training loss (and validation loss) vs step; below it, learning rate and
  grad norm (log scale).
- ``throughput.png``: tokens/s (and MFU) vs step.
- ``expert_load.png``: the share of routed tokens per expert (rows: MoE layers, columns:
  experts) from the counts summed over the **last 20% of logged steps**, where the router
  has settled, rather than the whole run, which the early imbalance would dominate; below
  it, max/mean load per layer vs step.

Missing data (no validation, no MoE layers, no MFU on CPU) skips its panel or file with a
printed note. A resumed run repeats the records written after its last checkpoint; the last
record per (kind, step) is kept. Exits with 2 when RUN_DIR has no metrics.jsonl.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

# The object-oriented API with an explicit Agg canvas: no pyplot, so no display, no global
# backend switch in a trainer that imports this, and no figures kept alive by a manager.
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from foldmesh.train.metrics import METRICS_FILE, read_metrics

LOAD_WINDOW = 0.2
"""Fraction of the logged MoE steps (the last ones) summed for the expert-load heatmap."""


def latest_per_step(records: list[dict], kind: str) -> list[dict]:
    """The records of ``kind``, the last one per step, sorted by step."""
    last = {r["step"]: r for r in records if r.get("kind") == kind and r.get("step") is not None}
    return [last[s] for s in sorted(last)]


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) where ``key`` is set; non-finite values become NaN (a gap in the line).

    None when no record has the key.
    """
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if not pts:
        return None
    steps, vals = zip(*pts, strict=True)
    vals = np.array(vals, dtype=float)
    vals[~np.isfinite(vals)] = np.nan
    return np.array(steps), vals


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _plot_loss(train: list[dict], val: list[dict], path: Path) -> Path | None:
    loss = _series(train, "loss")
    if loss is None:
        print("note: no training loss; skipped loss.png")
        return None
    lr, gnorm = _series(train, "lr"), _series(train, "grad_norm")
    lower = lr is not None or gnorm is not None
    fig = Figure(figsize=(9, 7 if lower else 4), layout="constrained")
    axes = fig.subplots(2 if lower else 1, 1, sharex=True, squeeze=False)[:, 0]

    ax = axes[0]
    ax.plot(*loss, lw=1, label="train")
    vloss = _series(val, "val_loss")
    if vloss is None:
        print("note: no validation records; loss.png shows training loss only")
    else:
        ax.plot(*vloss, "o-", ms=4, label="validation")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)

    if not lower:
        print("note: no lr or grad norm; loss.png has no second panel")
    else:
        ax = axes[1]
        if lr is not None:
            ax.plot(*lr, color="tab:green", lw=1)
            ax.set_ylabel("learning rate", color="tab:green")
        if gnorm is not None:
            # Grad norm spans orders of magnitude (spikes); a log axis of its own.
            gx = ax.twinx() if lr is not None else ax
            pos = gnorm[1] > 0
            gx.plot(gnorm[0][pos], gnorm[1][pos], color="tab:red", lw=0.8)
            gx.set_yscale("log")
            gx.set_ylabel("grad norm", color="tab:red")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return _save(fig, path)


def _plot_throughput(train: list[dict], path: Path) -> Path | None:
    tps = _series(train, "tokens_per_s")
    if tps is None:
        print("note: no tokens/s; skipped throughput.png")
        return None
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(*tps, lw=1, color="tab:blue")
    ax.set_ylabel("tokens/s", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    mfu = _series(train, "mfu")
    if mfu is None:
        print("note: no MFU (CPU run?); throughput.png shows tokens/s only")
    else:
        mx = ax.twinx()
        mx.plot(mfu[0], 100 * mfu[1], lw=1, color="tab:orange")
        mx.set_ylabel("MFU (%)", color="tab:orange")
    return _save(fig, path)


def _plot_expert_load(train: list[dict], path: Path) -> Path | None:
    moe = [r for r in train if r.get("experts")]
    if not moe:
        print("note: no expert records (dense model?); skipped expert_load.png")
        return None
    layers = sorted({k for r in moe for k in r["experts"]}, key=int)
    row = {k: i for i, k in enumerate(layers)}
    n_exp = max(len(v["counts"]) for r in moe for v in r["experts"].values())

    window = moe[-max(1, math.ceil(LOAD_WINDOW * len(moe))) :]
    counts = np.zeros((len(layers), n_exp))
    for r in window:
        for k, v in r["experts"].items():
            counts[row[k], : len(v["counts"])] += v["counts"]
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)

    fig = Figure(figsize=(max(7.0, 0.35 * n_exp + 3), 4 + 0.3 * len(layers) + 3.5),
                 layout="constrained")
    ax_map, ax_line = fig.subplots(2, 1, height_ratios=[0.3 * len(layers) + 1, 3])

    # Diverging around the uniform share 100/E %: red is overloaded, blue underloaded.
    pct, uniform = 100 * share, 100.0 / n_exp
    top = max(float(np.nanmax(pct)) if np.isfinite(pct).any() else 0.0, 2 * uniform)
    norm = TwoSlopeNorm(vcenter=uniform, vmin=0.0, vmax=top)
    im = ax_map.imshow(pct, aspect="auto", cmap="RdBu_r", interpolation="nearest", norm=norm)
    if pct.size <= 128:
        for (i, j), v in np.ndenumerate(pct):
            if np.isfinite(v):
                dark = abs(norm(v) - 0.5) > 0.35
                ax_map.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    ax_map.set_yticks(range(len(layers)), [f"L{k}" for k in layers])
    ax_map.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_map.set_xlabel("expert")
    ax_map.set_title(f"routed tokens per expert, steps {window[0]['step']}-{window[-1]['step']}"
                     f" (last {LOAD_WINDOW:.0%} of logged)", fontsize=10)
    fig.colorbar(im, ax=ax_map, label=f"share (%), uniform {uniform:.1f}")

    # Up to 16 layers get a legend; beyond that a legend is unreadable, so colour is depth.
    legend = len(layers) <= 16
    for i, k in enumerate(layers):
        pts = [(r["step"], r["experts"][k].get("max_over_mean")) for r in moe if k in r["experts"]]
        pts = [(s, v) for s, v in pts if v is not None]
        colour = None if legend else colormaps["viridis"](i / (len(layers) - 1))
        if pts:
            ax_line.plot(*zip(*pts, strict=True), lw=1, label=f"L{k}", color=colour)
    ax_line.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_line.set_xlabel("step")
    if legend:
        ax_line.set_ylabel("max/mean expert load")
        ax_line.legend(ncol=min(len(layers), 8), fontsize=7)
    else:
        ax_line.set_ylabel("max/mean expert load\n(colour: layer, dark = first)")
    ax_line.grid(alpha=0.3)
    return _save(fig, path)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's PNGs into ``out_dir`` (default ``run_dir``); returns the files written.

    Raises FileNotFoundError when ``run_dir`` has no metrics.jsonl.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    records = read_metrics(run_dir)
    train, val = latest_per_step(records, "train"), latest_per_step(records, "val")
    written = [
        _plot_loss(train, val, out / "loss.png"),
        _plot_throughput(train, out / "throughput.png"),
        _plot_expert_load(train, out / "expert_load.png"),
    ]
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m foldmesh.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs "
                        "(default: RUN_DIR)")
    args = parser.parse_args(argv)
    if not (args.run_dir / METRICS_FILE).is_file():
        print(f"foldmesh.plot: no {METRICS_FILE} in {args.run_dir}; pass the run directory "
              "the trainer wrote (its checkpoint.dir setting)", file=sys.stderr)
        return 2
    for path in plot_run(args.run_dir, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
