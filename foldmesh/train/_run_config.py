"""The resolved configuration a run directory keeps: ``<run>/config.toml``.

The trainer's rank 0 writes it at the start of every launch (``format_config``: every
section, every field), so tools that work on a finished run, such as
``python -m foldmesh.generate``, rebuild the same model without the command line that
trained it. A resumed launch overwrites it with its own settings.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ._config_io import ConfigError, config_from_dict, format_config
from .config import TrainConfig

RUN_CONFIG = "config.toml"


def write_run_config(cfg: TrainConfig) -> Path:
    """Write ``cfg`` to ``cfg.checkpoint.dir``/config.toml atomically (through a rename)."""
    path = Path(cfg.checkpoint.dir) / RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(format_config(cfg), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The ``TrainConfig`` of the run in ``run_dir``; ``ConfigError`` naming the file when it
    is missing or does not parse."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: {run_dir} is not a run directory written by "
                          "this version of the trainer (it writes config.toml when a launch "
                          "starts); pass the run's checkpoint.dir, or launch it again to "
                          "resume and write the file")
    try:
        return config_from_dict(tomllib.loads(path.read_text(encoding="utf-8")))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML ({e}); restore it") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
