"""The trainer's configuration: sectioned dataclasses, TOML files, ``--section.field`` flags.

    cfg = load_config()                      # --preset, --config FILE.toml, overrides
    validate_config(cfg, world_size)         # every setting against the fold and the model
    print(format_config(cfg))                # the resolved config, as TOML

Only the configuration lives here, so importing ``foldmesh.train`` starts no process group;
the trainer itself is ``foldmesh.train.trainer``.
"""

from ._config_check import model_config, validate_config
from ._config_cli import TRAIN_PRESETS, load_config
from ._config_io import ConfigError, config_from_dict, config_to_dict, format_config
from .config import TrainConfig

__all__ = [
    "TRAIN_PRESETS",
    "ConfigError",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "format_config",
    "load_config",
    "model_config",
    "validate_config",
]
