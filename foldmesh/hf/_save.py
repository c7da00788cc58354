"""Save a (possibly sharded) foldmesh ``Transformer`` as a Hugging Face checkpoint.

Every rank gathers the DTensor parameters one at a time (``full_tensor``, a collective) and
global rank 0 writes them in the Hub's per-expert format, one safetensors shard at a time,
so rank 0 holds at most one shard plus one parameter. The files go to a temporary directory
next to the target, which replaces the target only once complete: a crash never leaves a
half-written checkpoint that looks whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from ..models import Transformer
from ._config import hf_config_from, infer_architecture
from ._load import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME
from ._names import CheckpointError, Source, Tensor, canonical, tensor_map

# Files that a save rewrites; anything else in an existing target (tokenizer, generation
# config) is carried over into the new directory.
_OURS = re.compile(r"(config\.json|model\.safetensors(\.index\.json)?"
                   r"|model-\d+-of-\d+\.safetensors)")


def _to_hf(src: Source, t: torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(src, Tensor):
        return {src.name: t.contiguous()}
    return {src.pattern.format(e=e): t[e].T.contiguous() for e in range(t.shape[0])}


def _plan(params: dict[str, torch.Tensor], dtype: torch.dtype | None, limit: int
          ) -> list[list[str]]:
    """Parameter names per shard, in order: a shard closes before it would pass ``limit``
    bytes (a parameter larger than ``limit`` gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, p in params.items():
        n = p.numel() * (dtype or p.dtype).itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _publish(tmp: Path, path: Path) -> None:
    """Move the complete checkpoint ``tmp`` to ``path``, keeping ``path``'s other files."""
    if not path.exists():
        os.replace(tmp, path)
        return
    for item in path.iterdir():
        if not _OURS.fullmatch(item.name):
            if item.is_dir():
                shutil.copytree(item, tmp / item.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(item), str(tmp / item.name))
    old = tmp.with_name(tmp.name + ".old")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)


class _Writer:
    """Rank 0's side of a save: the shards written so far, and the first error."""

    def __init__(self, path: Path, num_shards: int):
        self.path, self.num_shards = path, num_shards
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.error: BaseException | None = None
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"save_pretrained path {path} is a file; pass a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))

    def shard(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        name = WEIGHTS_NAME if self.num_shards == 1 else \
            f"model-{k + 1:05d}-of-{self.num_shards:05d}.safetensors"
        save_file(tensors, self.tmp / name, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self, config: dict) -> None:
        if self.num_shards > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _publish(self.tmp, self.path)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def save_pretrained(model: Transformer, path: str | Path, architecture: str | None = None,
                    max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` to the directory ``path`` as a Hugging Face checkpoint that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    A collective when the model holds DTensors: every rank calls it; global rank 0 writes.
    A tied output projection is not written (tie_word_embeddings=true). Router buffers
    (expert bias) have no Hub counterpart and are not written.

    Args:
        architecture: e.g. "Qwen2MoeForCausalLM"; default the one the model was loaded
            as (``model.hf_architecture``), else the one whose features the config uses.
        max_shard_bytes: above this the weights are split into model-0000k-of-0000n files
            with a model.safetensors.index.json.
        dtype: dtype of the written tensors; None: each parameter's own.

    Raises:
        CheckpointError: the architecture cannot express the config (on every rank, before
            any collective), the model lacks parameters, or rank 0 failed to write.
    """
    path = Path(path)
    cfg = model.config
    arch = architecture or getattr(model, "hf_architecture", None) or infer_architecture(cfg)
    config = hf_config_from(cfg, arch, getattr(model, "hf_config", None))
    sources = tensor_map(cfg, arch)
    held = {canonical(n): p for n, p in model.named_parameters()}
    unknown = sorted(set(held) - set(sources))
    absent = [n for n in sources if n not in held]
    if unknown or absent:
        raise CheckpointError(f"model parameters {unknown[:5]} have no counterpart in {arch}, "
                              f"and {absent[:5]} are missing; save_pretrained needs a whole "
                              "Transformer (not one pipeline stage) with tied weights re-tied")
    params = {n: held[n] for n in sources}
    config["dtype"] = str(dtype or params["embed.weight"].dtype).removeprefix("torch.")
    plan = _plan(params, dtype, max_shard_bytes)
    writer: _Writer | None = None
    error: BaseException | None = None
    if not _distributed() or dist.get_rank() == 0:
        try:
            writer = _Writer(path, len(plan))
        except Exception as e:  # reported after the collectives, which every rank must run
            error = e
    for k, names in enumerate(plan):
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            p = params[name]
            full = (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            if writer is not None and error is None:
                tensors.update(_to_hf(sources[name], full.to("cpu", dtype or full.dtype)))
        if writer is not None and error is None:
            try:
                writer.shard(k, tensors)
            except Exception as e:
                error = e
    if writer is not None and error is None:
        try:
            writer.finish(config)
        except Exception as e:
            error = e
    if writer is not None and writer.tmp.exists():
        shutil.rmtree(writer.tmp)  # after a failure; a published tmp no longer exists
    _agree(error, path)


def _agree(error: BaseException | None, path: Path) -> None:
    """Every rank returns only once rank 0 is done, and raises if rank 0 failed."""
    if _distributed():
        msg = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(msg, src=0)
        if msg[0] is not None and error is None:
            raise CheckpointError(f"rank 0 failed to write {path}: {msg[0]}")
    if error is not None:
        raise error
