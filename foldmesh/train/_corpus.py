"""Document corpora for the trainer: which tokenizer, where the tokens live, and tokenizing a
``data.source = "corpus"`` once, before any process group exists.

``"corpus"`` (local text, JSON Lines or Parquet files under ``data.path``) is tokenized by
global rank 0 into ``<checkpoint.dir>/tokens`` with ``foldmesh.data.prepare`` (every core,
resumable, verified by its manifest); the other ranks wait for the manifest. A restarted or
resumed run finds the directory complete and reuses it. ``"prepared"`` names such a
directory directly (``python -m foldmesh.data.prepare``): no tokenizer is needed at run time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..data import DataError
from ._config_io import ConfigError
from .config import TrainConfig
from .metrics import on_terminal

DOCUMENT_SOURCES = ("corpus", "prepared")
_WAIT_S = 24 * 3600  # a large corpus takes long; a failure on rank 0 is reported at once


def tokenizer_spec(cfg: TrainConfig) -> str:
    """``data.tokenizer``, or by default ``model.hf_path``'s tokenizer when that directory
    holds a tokenizer.json, else "bytes"."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.model.hf_path and (Path(cfg.model.hf_path) / "tokenizer.json").is_file():
        return cfg.model.hf_path
    return "bytes"


def token_dir(cfg: TrainConfig) -> Path:
    """Where the tokens of a document source are (or will be, for "corpus")."""
    if cfg.data.source == "prepared":
        return Path(cfg.data.path)
    return Path(cfg.checkpoint.dir) / "tokens"


def _launch_key() -> str:
    """The same on every rank of one launch attempt, different for the next: torchrun's
    rendezvous id, restart count and master endpoint."""
    env = os.environ
    parts = (env.get("TORCHELASTIC_RUN_ID", ""), env.get("TORCHELASTIC_RESTART_COUNT", "0"),
             env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", ""))
    return "-".join(p.replace("/", "_") for p in parts)


def prepare_corpus(cfg: TrainConfig, rank: int) -> None:
    """For ``data.source = "corpus"``: rank 0 tokenizes the corpus into ``token_dir(cfg)``
    (resuming an interrupted attempt, or only verifying a complete one); the other ranks wait
    for its marker of this launch. Raises ``ConfigError`` naming the file and the setting on
    every rank when the corpus is bad."""
    if cfg.data.source != "corpus":
        return
    out = token_dir(cfg)
    key = _launch_key()
    done, failed = out / f".prepared-{key}", out / f".failed-{key}"
    if rank == 0:
        from ..data.prepare import prepare

        out.mkdir(parents=True, exist_ok=True)
        for old in [*out.glob(".prepared-*"), *out.glob(".failed-*")]:
            old.unlink(missing_ok=True)
        try:
            prepare(tokenizer_spec(cfg), [cfg.data.path], out, text_field=cfg.data.text_field,
                    progress=cfg.metrics.progress and on_terminal())
        except DataError as e:
            failed.write_text(str(e))
            raise ConfigError(f"data.source = 'corpus': {e}") from None
        done.touch()
        return
    deadline = time.monotonic() + _WAIT_S
    while time.monotonic() < deadline:
        if failed.is_file():
            raise ConfigError(f"data.source = 'corpus': {failed.read_text()}")
        if done.is_file():
            return
        time.sleep(0.2)
    raise ConfigError(f"rank 0 did not finish tokenizing data.path = {cfg.data.path!r} "
                      f"into {out} within {_WAIT_S} s")
