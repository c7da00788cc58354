"""Distributed checkpoints: atomic, verified, resharded on load, the newest N kept.

Layout of a run directory::

    checkpoints/step-00000100/      a complete checkpoint
        .metadata, __*_*.distcp     torch.distributed.checkpoint (model and optimizer)
        rng-rank*.pt                each rank's RNG state
        extra.json                  step, data position, scheduler, fold and world size
        MANIFEST.json               every file above with its size, written last
    checkpoints/step-00000200.tmp/  being written (or left by a crash): never loaded

Every rank writes into the ``.tmp`` directory; after a barrier rank 0 lists the files with
their sizes into MANIFEST.json, flushes it to disk and renames the directory. A crash at any
moment therefore leaves either no new checkpoint or a complete one. Loading checks the
manifest first (every file present, every size exact) and refuses the checkpoint otherwise,
before reading a byte of it. DCP stores global shapes and offsets, so a checkpoint written
under one fold and world size loads under another (resharding).

Keys are the whole model's parameter names (``layers.<global index>...``), and the optimizer
state is flattened onto the same names (``state.<name>.exp_avg``...): a pipeline stage
saves and loads exactly its own keys, so a checkpoint written with one pp (and one
schedule, stages per rank or layer split) resumes with another.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

MANIFEST = "MANIFEST.json"
EXTRA = "extra.json"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories that finished writing (have a manifest), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and not p.name.endswith(".tmp") and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify(path: Path) -> dict:
    """Check ``path`` against its manifest; return its extra state. Raises CheckpointError."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it was never completed; "
                              "delete it and resume from an earlier one")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_file} is not valid JSON ({e}); the checkpoint is "
                              "damaged: delete it and resume from an earlier one") from None
    for name, size in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; it is incomplete and "
                                  "is not loaded: restore the file or delete the checkpoint")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {path}: {name} has {f.stat().st_size} bytes but was written with "
                f"{size} (truncated or altered); it is not loaded: restore the file or delete "
                "the checkpoint")
    return json.loads((path / EXTRA).read_text())


_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _state(parts, optimizers) -> dict:
    """This rank's model and optimizer state under global names, over its pipeline stages
    (``parts``, one optimizer each; a single model and optimizer without pp)."""
    model, optim = {}, {}
    for part, opt in zip(parts, optimizers, strict=True):
        model.update(get_model_state_dict(part))
        optim.update(get_optimizer_state_dict(part, opt, options=_FLAT))
    return {"model": model, "optim": optim}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: str | Path, step: int, parts, optimizers, extra: dict, keep: int) -> Path:
    """Write the checkpoint of ``step`` atomically (every rank calls this) and keep the newest
    ``keep``. ``parts``/``optimizers``: this rank's pipeline stages and their optimizers.
    ``extra``: JSON-serialisable state from rank 0 (data position, scheduler...)."""
    root = checkpoint_dir(run_dir)
    final = root / _name(step)
    tmp = root / (_name(step) + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(parts, optimizers), checkpoint_id=str(tmp))
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        (tmp / EXTRA).write_text(json.dumps({**extra, "step": step}, indent=1))
    dist.barrier()  # every rank's files are written
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        with open(tmp / MANIFEST, "w") as f:
            json.dump({"step": step, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. after a restart): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load(path: Path, parts, optimizers) -> dict:
    """Load ``path`` into this rank's stages and optimizers (resharding as needed); every
    rank calls this. Returns the extra state. The checkpoint is verified before anything is
    read; a damaged one raises CheckpointError and leaves the model untouched."""
    extra = verify(path)
    state = _state(parts, optimizers)
    dcp.load(state, checkpoint_id=str(path))
    for part, opt in zip(parts, optimizers, strict=True):
        # each stage takes its own keys from the rank's merged state
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(part, opt, state["optim"], options=_FLAT)
    rng = path / f"rng-rank{dist.get_rank()}.pt"
    if rng.is_file():  # absent when resuming on more ranks than wrote the checkpoint
        saved = torch.load(rng, weights_only=False)
        torch.set_rng_state(saved["cpu"])
        if saved["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda"])
    return extra
