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
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
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


def _plan(sizes: dict[str, int], owners: dict[str, int], limit: int) -> list[list[str]]:
    """Parameter names per shard, in order: a shard closes before it would pass ``limit``
    bytes (a parameter larger than ``limit`` gets a shard of its own) and wherever the owning
    pipeline stage changes, so that one stage writes each shard."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in sizes.items():
        if shards[-1] and (size + n > limit or owners[shards[-1][-1]] != owners[name]):
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


def _shard_name(k: int, num_shards: int) -> str:
    return WEIGHTS_NAME if num_shards == 1 else \
        f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _tmp_dir(path: Path) -> tuple[Path | None, BaseException | None]:
    """Global rank 0 creates the directory every writer fills; all ranks learn its name."""
    tmp, error = None, None
    if not _distributed() or dist.get_rank() == 0:
        try:
            if path.exists() and not path.is_dir():
                raise CheckpointError(f"save_pretrained path {path} is a file; pass a directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        except Exception as e:  # reported after the collectives, which every rank must run
            error = e
    if _distributed():
        box = [None if tmp is None else str(tmp)]
        dist.broadcast_object_list(box, src=0)
        tmp = None if box[0] is None else Path(box[0])
    return tmp, error


def _gather(obj) -> list:
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_pretrained(model: Transformer | Sequence[Transformer], path: str | Path,
                    architecture: str | None = None, max_shard_bytes: int = 5 * 2**30,
                    dtype: torch.dtype | None = None, mesh=None) -> None:
    """Write ``model`` to the directory ``path`` as a Hugging Face checkpoint that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    A collective when the model holds DTensors or lives on several pipeline stages: every
    rank calls it. Without pp, global rank 0 writes; with pp > 1 (``model`` is this rank's
    list of stages and ``mesh`` the folded mesh) the first rank of each pipeline stage
    writes the shards of that stage's parameters, and global rank 0 the index and config.
    A tied output projection is not written (tie_word_embeddings=true). Of the router
    buffers only DeepSeek-V3's expert bias has a Hub counterpart (``e_score_correction_bias``,
    written in fp32 whatever ``dtype`` says, as transformers keeps it); the others are not
    written.

    Args:
        model: a whole ``Transformer``, or this rank's pipeline stages.
        architecture: e.g. "Qwen2MoeForCausalLM"; default the one the model was loaded
            as (``model.hf_architecture``), else the one whose features the config uses.
        max_shard_bytes: above this the weights are split into model-0000k-of-0000n files
            with a model.safetensors.index.json (a pipeline writes at least one per stage).
        dtype: dtype of the written tensors; None: each parameter's own.
        mesh: the ``FoldedMesh`` when ``model`` is pipeline stages (pp > 1).

    Raises:
        CheckpointError: the architecture cannot express the config (on every rank, before
            any collective), the stages together lack parameters, or a writer failed.
    """
    path = Path(path)
    parts = [model] if isinstance(model, nn.Module) else list(model)
    first = parts[0]
    cfg = first.config
    arch = architecture or getattr(first, "hf_architecture", None) or infer_architecture(cfg)
    config = hf_config_from(cfg, arch, getattr(first, "hf_config", None))
    sources = tensor_map(cfg, arch)
    held = {canonical(n): p for part in parts for n, p in part.named_parameters()}
    buffers = {canonical(n): b for part in parts for n, b in part.named_buffers()
               if canonical(n) in sources}
    held.update(buffers)
    pp = mesh.fold.pp if mesh is not None else 1
    stage = mesh.coordinate("pp") if pp > 1 else 0
    # every rank learns which stage holds each parameter, and its size
    owners, sizes, dtypes = {}, {}, {}
    for r_stage, info in _gather((stage, {n: (p.numel(), str(p.dtype)) for n, p in
                                          held.items()})):
        for n, (numel, dt) in info.items():
            owners[n] = r_stage
            sizes[n], dtypes[n] = numel, dt
    unknown = sorted(set(owners) - set(sources))
    absent = [n for n in sources if n not in owners]
    if unknown or absent:
        raise CheckpointError(f"model parameters {unknown[:5]} have no counterpart in {arch}, "
                              f"and {absent[:5]} are missing; save_pretrained needs a whole "
                              "Transformer (or every pipeline stage, with mesh=) with tied "
                              "weights re-tied")
    names = list(sources)
    config["dtype"] = str(dtype or dtypes["embed.weight"]).removeprefix("torch.")
    own = {n: getattr(torch, dtypes[n].removeprefix("torch.")) for n in names}
    out_dtype = {n: own[n] if dtype is None or n.endswith("router.expert_bias") else dtype
                 for n in names}
    itemsize = {n: out_dtype[n].itemsize for n in names}
    plan = _plan({n: sizes[n] * itemsize[n] for n in names}, owners, max_shard_bytes)
    # the first rank of each stage writes (dp = cp = tp = 0; global rank 0 for stage 0)
    leader = not _distributed() or (
        dist.get_rank() == 0 if mesh is None or pp == 1
        else all(mesh.coordinate(a) == 0 for a in ("dp", "cp", "tp")))
    tmp, error = _tmp_dir(path)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(plan):
        if owners[shard[0]] != stage:
            continue
        tensors: dict[str, torch.Tensor] = {}
        for name in shard:
            p = held[name]
            full = (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            if leader and tmp is not None:
                tensors.update(_to_hf(sources[name], full.to("cpu", out_dtype[name])))
        if leader and tmp is not None and error is None:
            try:
                file = _shard_name(k, len(plan))
                save_file(tensors, tmp / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, file))
                total += sum(t.numel() * t.element_size() for t in tensors.values())
            except Exception as e:
                error = e
    results = _gather((weight_map, total, None if error is None
                       else f"{type(error).__name__}: {error}"))
    failed = [msg for _, _, msg in results if msg is not None]
    if tmp is not None and (not _distributed() or dist.get_rank() == 0) and not failed:
        try:
            if len(plan) > 1:
                merged = {n: f for wm, _, _ in results for n, f in wm.items()}
                index = {"metadata": {"total_size": sum(t for _, t, _ in results)},
                         "weight_map": dict(sorted(merged.items()))}
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            _publish(tmp, path)
        except Exception as e:
            error = e
    if tmp is not None and tmp.exists() and (not _distributed() or dist.get_rank() == 0):
        shutil.rmtree(tmp)  # after a failure; a published tmp no longer exists
    _agree(path, error, failed)


def _agree(path: Path, error: BaseException | None, failed: list[str]) -> None:
    """Every rank returns only once rank 0 is done, and every rank raises if a writer or the
    publication failed (rank 0 its own error)."""
    status = [None]
    if not _distributed() or dist.get_rank() == 0:
        if error is not None:
            status = [f"{type(error).__name__}: {error}"]
        elif failed:
            status = [failed[0]]
    if _distributed():
        dist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise CheckpointError(f"writing {path} failed ({status[0]}); {path} is unchanged")
