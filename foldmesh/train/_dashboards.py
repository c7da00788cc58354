"""Dashboards beside metrics.jsonl: TensorBoard event files and Weights & Biases (offline).

    metrics.tensorboard = true   ->  <run>/tensorboard/events.out.tfevents.*
    metrics.wandb = true         ->  <run>/wandb/offline-run-*   (``wandb sync`` uploads it)

Both take, on rank 0, the same scalars as each metrics.jsonl ``train`` and ``val`` record,
tagged by the record's key (``scalars``):

    loss, aux_loss, z_loss, lr, grad_norm, tokens_per_s, mfu, peak_mem_gib, step_time_s,
    experts/L<i>/max_over_mean, experts/L<i>/dropped     (train records)
    val_loss                                             (val records)

A key that is None in the record (no MFU on CPU, no z-loss) is left out, not written as 0.
Neither package is a dependency of foldmesh: ``check_dashboards`` (called by
``validate_config``) names the setting and the ``pip install`` when one is asked for but
missing, before any process group exists.

A resumed run repeats the steps after its last checkpoint. The TensorBoard writer is opened
with ``purge_step`` = the first step of this launch, so TensorBoard drops the earlier
launch's events from there on (as metrics.jsonl readers keep the last record per step);
W&B offline starts a new run per launch.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ._config_io import ConfigError, config_to_dict
from .config import MetricsSection, TrainConfig

TENSORBOARD_DIR = "tensorboard"
TRAIN_SCALARS = ("loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                 "peak_mem_gib", "step_time_s")
"""The train record's keys that are scalars (``experts`` adds two per MoE layer)."""
EXPERT_SCALARS = ("max_over_mean", "dropped")

_PACKAGES = {  # setting -> (module the writer imports, what pip installs)
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}


def importable(module: str) -> bool:
    """Whether ``module`` imports (the check the tests replace to simulate a missing one)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_dashboards(metrics: MetricsSection) -> None:
    """Raise ``ConfigError`` when ``metrics.tensorboard`` or ``metrics.wandb`` is on but its
    package does not import."""
    for setting, (module, package) in _PACKAGES.items():
        if getattr(metrics, setting) and not importable(module):
            raise ConfigError(
                f"metrics.{setting} = true needs the {package} package, which is not "
                f"installed (it is not a dependency of foldmesh): pip install {package}, or "
                f"set metrics.{setting} = false")


def scalars(record: dict) -> dict[str, float]:
    """Tag -> value of a metrics.jsonl ``train`` or ``val`` record (see the module docstring);
    None values are left out, everything else becomes a float (NaN and inf stay)."""
    out = {}
    for key in (*TRAIN_SCALARS, "val_loss"):
        if record.get(key) is not None:
            out[key] = float(record[key])
    for layer, stats in (record.get("experts") or {}).items():
        for key in EXPERT_SCALARS:
            if stats.get(key) is not None:
                out[f"experts/L{layer}/{key}"] = float(stats[key])
    return out


class TensorBoardSink:
    """``<run_dir>/tensorboard`` event files through ``torch.utils.tensorboard``."""

    def __init__(self, run_dir: str | Path):
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self._writer = None

    def open(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops an earlier launch's events from this step on
        self._writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():  # float32 in the event file (TensorBoard's scalars)
            self._writer.add_scalar(tag, v, global_step=step)
        self._writer.flush()  # as metrics.jsonl: a crash loses at most this record

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbSink:
    """An offline Weights & Biases run in ``<run_dir>/wandb`` (``wandb sync`` uploads it)."""

    def __init__(self, run_dir: str | Path, cfg: TrainConfig):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self._run = None

    def open(self, start_step: int) -> None:
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(mode="offline", dir=str(self.run_dir), project="foldmesh",
                               name=self.run_dir.name, config=config_to_dict(self.cfg))

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def open_dashboards(cfg: TrainConfig, enabled: bool) -> list:
    """The sinks ``cfg.metrics`` asks for (none when not ``enabled``: ranks other than 0),
    for ``MetricsLogger(sinks=...)``; each is opened when the first record is logged."""
    if not enabled:
        return []
    sinks: list = []
    if cfg.metrics.tensorboard:
        sinks.append(TensorBoardSink(cfg.checkpoint.dir))
    if cfg.metrics.wandb:
        sinks.append(WandbSink(cfg.checkpoint.dir, cfg))
    return sinks
