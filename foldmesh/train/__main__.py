"""``torchrun --nproc-per-node N -m foldmesh.train --config FILE.toml [--section.field value]``

Every rank parses and checks the whole configuration (and opens the data; rank 0 first
tokenizes a ``data.source = "corpus"``) before any process group exists, so a bad setting or
file fails fast with a message naming it; rank 0 prints the resolved configuration.
"""

from __future__ import annotations

import os
import sys

from ..data import DataError
from . import ConfigError, format_config, load_config, model_config, validate_config
from ._corpus import DOCUMENT_SOURCES, prepare_corpus, token_dir
from .data import build_data


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
        validate_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        # a document corpus is tokenized (rank 0) and opened (every rank) here, so that a bad
        # or too small corpus fails naming the file before any process group exists
        if cfg.data.source in DOCUMENT_SOURCES:
            prepare_corpus(cfg, int(os.environ.get("RANK", "0")))
            build_data(cfg.data, cfg.training.global_batch, cfg.training.seed, token_dir(cfg))
        if cfg.data.source == "tokens":  # one scan of the files for their largest id
            train, _ = build_data(cfg.data, cfg.training.global_batch, cfg.training.seed)
            vocab = model_config(cfg).vocab_size
            if train.min_vocab > vocab:
                raise ConfigError(
                    f"the token files of data.path = {cfg.data.path!r} hold ids up to "
                    f"{train.min_vocab - 1} (a vocabulary of {train.min_vocab}) but the model's "
                    f"vocab_size is {vocab}: set model.overrides.vocab_size >= "
                    f"{train.min_vocab} or use the model's own token files")
    except (ConfigError, DataError) as e:
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
