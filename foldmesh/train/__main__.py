"""``torchrun --nproc-per-node N -m foldmesh.train --config FILE.toml [--section.field value]``

Every rank parses and checks the whole configuration before any process group exists, so a
bad setting fails fast with a message naming it; rank 0 prints the resolved configuration.
"""

from __future__ import annotations

import os
import sys

from . import ConfigError, format_config, load_config, validate_config


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
        validate_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print(f"foldmesh.train: invalid configuration: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_config(cfg), flush=True)
    import torch.distributed as dist

    from .trainer import Trainer

    try:
        Trainer(cfg).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
