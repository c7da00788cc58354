"""``torchrun --nproc-per-node N -m foldmesh.train --config FILE.toml [--section.field value]``

``python -m foldmesh.train --config FILE.toml --plan [GPUS] [--plan-gpu h100]`` prints the
planner's estimate for the run (``foldmesh.plan``) on GPUS GPUs (default: ``WORLD_SIZE``)
and exits without training.

Every rank parses and checks the whole configuration (and opens the data; rank 0 first
tokenizes a ``data.source = "corpus"``) before any process group exists, so a bad setting or
file fails fast with a message naming it; rank 0 prints the resolved configuration.
"""

from __future__ import annotations

import gc
import os
import sys

from ..data import DataError
from . import ConfigError, format_config, load_config, model_config, validate_config
from ._corpus import DOCUMENT_SOURCES, prepare_corpus, token_dir
from .data import build_data


def _plan_flags(argv: list[str]) -> tuple[list[str], int | None, str] | None:
    """Remove ``--plan [GPUS]`` and ``--plan-gpu NAME`` from argv; None without --plan."""
    if "--plan" not in argv:
        return None
    argv = list(argv)
    i = argv.index("--plan")
    del argv[i]
    gpus = None
    if i < len(argv) and argv[i].isdigit():
        gpus = int(argv.pop(i))
    gpu = "h100"
    if "--plan-gpu" in argv:
        j = argv.index("--plan-gpu")
        if j + 1 >= len(argv):
            raise ConfigError("--plan-gpu needs a GPU preset name or a .toml file")
        gpu = argv[j + 1]
        del argv[j:j + 2]
    return argv, gpus, gpu


def plan(argv: list[str], gpus: int | None, gpu: str) -> int:
    """The planner's estimate for this config; 0 when it fits, 1 when it does not."""
    from .._fold import FoldError
    from ..plan import estimate, from_train_config, hardware, valid
    from ..plan._report import table

    try:
        cfg = load_config(argv)
        gpus = gpus or int(os.environ.get("WORLD_SIZE", "0"))
        if gpus <= 0:
            raise ConfigError("--plan needs the number of GPUs: --plan 128 (or set "
                              "WORLD_SIZE)")
        # the data is not read: a config for a cluster can be planned anywhere
        workload, layout = from_train_config(cfg, gpus, "cuda")
        why = valid(workload, layout)
        if why:
            raise FoldError(why)
        e = estimate(workload, layout, hardware(gpu))
    except (ConfigError, FoldError) as err:
        print(f"foldmesh.train --plan: {err}", file=sys.stderr)
        return 2
    print(table([e], 1))
    if not e.fits:
        print(f"\ndoes not fit: {e.limit} is the largest term; see python -m foldmesh.plan "
              f"--model {cfg.model.hf_path or cfg.model.preset} --gpus {gpus} for layouts "
              "that do")
    return 0 if e.fits else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags = _plan_flags(argv)
    except ConfigError as e:
        print(f"foldmesh.train: invalid configuration: {e}", file=sys.stderr)
        return 2
    if flags is not None:
        return plan(*flags)
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
        # The trainer's model and FSDP state form reference cycles that hold process
        # groups. Left to the interpreter's shutdown, gloo's worker threads are joined while
        # Python is being torn down, which now and then aborts the rank (SIGABRT, "terminate
        # called without an active exception") after a finished run. Collect them first,
        # so the groups die here, while the interpreter is whole.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
