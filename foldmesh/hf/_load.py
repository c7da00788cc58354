"""Load a Hugging Face checkpoint into a (possibly sharded) foldmesh ``Transformer``.

Each rank reads only the part of each tensor it owns: for a DTensor parameter, the rows and
columns of its local block (``compute_local_shape_and_global_offset``), and for stacked
experts [E, H, F] only its experts and FFN columns, one Hub tensor per expert. safetensors
maps the files, so a slice costs the bytes it covers. No collective runs here.

Placements: any mix of Shard, _StridedShard (FSDP2 over TP) and Replicate; Partial
parameters do not occur.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from ..models import Transformer
from ..moe import Router
from ._config import config_from_hf, infer_architecture
from ._names import CheckpointError, Source, Tensor, canonical, ignored, mtp_layer, tensor_map

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

Box = list[slice | torch.Tensor]
"""Per tensor dim: the global indices this rank holds, a range or an int64 tensor."""


def read_config(path: Path) -> dict:
    """config.json of the checkpoint directory ``path``, as a dict."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a local directory; download the checkpoint first "
                              "(huggingface_hub.snapshot_download) and pass its folder")
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}; a Hugging Face checkpoint "
                              "directory needs one next to its weights")
    return json.loads((path / CONFIG_NAME).read_text())


def weight_files(path: Path) -> dict[str, Path]:
    """Hub tensor name -> the safetensors file that holds it."""
    if (path / INDEX_NAME).is_file():
        weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        files = {name: path / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{path / INDEX_NAME} lists {f.name}, which is missing; "
                                      "copy the whole checkpoint directory")
        return files
    if (path / WEIGHTS_NAME).is_file():
        with safe_open(path / WEIGHTS_NAME, "pt") as f:
            return dict.fromkeys(f.keys(), path / WEIGHTS_NAME)
    raise CheckpointError(f"{path} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; foldmesh reads "
                          "safetensors checkpoints (convert *.bin files with transformers first)")


def _check_names(sources: dict[str, Source], files: dict[str, Path], tied: bool,
                 path: Path, skipped=lambda hf_name: False) -> None:
    wanted = {hf: fm for fm, src in sources.items() for hf in src.hf_names()}
    missing = [hf for hf in wanted if hf not in files]
    if missing:
        listed = ", ".join(f"{hf!r} (foldmesh parameter {wanted[hf]!r})" for hf in missing[:5])
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensor(s): {listed}; "
                              "check that config.json matches the weights")
    extra = [hf for hf in files if hf not in wanted and not ignored(hf) and not skipped(hf)
             and not (tied and hf == "lm_head.weight")]
    if extra:
        raise CheckpointError(f"checkpoint {path} has {len(extra)} tensor(s) that no foldmesh "
                              f"parameter reads: {sorted(extra)[:5]}; check that config.json "
                              "matches the weights (num_hidden_layers, mlp_only_layers, ...)")


def _placement_on_dim0(p):
    return _StridedShard(0, split_factor=p.split_factor) if isinstance(p, _StridedShard) \
        else Shard(0)


def local_box(p: torch.Tensor) -> Box:
    """The global indices, per dim, of the block of ``p`` that this rank holds."""
    if not isinstance(p, DTensor):
        return [slice(0, n) for n in p.shape]
    if not any(isinstance(pl, _StridedShard) for pl in p.placements):
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                              p.placements)
        return [slice(o, o + n) for o, n in zip(offset, shape, strict=True)]
    # A strided shard (FSDP over TP on one dim) holds non-contiguous rows: shard each dim's
    # index range the same way (locally, no collective) to learn which.
    # NOTE: host sync per dim on a GPU mesh (the indices come back to the CPU).
    box: Box = []
    for d in range(p.ndim):
        placements = [_placement_on_dim0(pl) if isinstance(pl, (Shard, _StridedShard))
                      and pl.dim == d else Replicate() for pl in p.placements]
        index = distribute_tensor(torch.arange(p.shape[d]), p.device_mesh, placements,
                                  src_data_rank=None)
        box.append(index.to_local().cpu())
    return box


def _read(sl, box: Box) -> torch.Tensor:
    """The block ``box`` of a safetensors slice: reads its bounding box, then picks rows."""
    bounds = tuple(b if isinstance(b, slice) else slice(int(b.min()), int(b.max()) + 1)
                   for b in box)
    t = sl[bounds]
    for d, b in enumerate(box):
        if isinstance(b, torch.Tensor):
            t = t.index_select(d, b - bounds[d].start)
    return t


def _fill(p: torch.Tensor, src: Source, slice_of) -> None:
    """Copy this rank's block of ``p`` from the Hub tensors ``src``; ``slice_of(name)``
    opens one as a safetensors slice."""
    local = p.to_local() if isinstance(p, DTensor) else p
    if local.numel() == 0:
        return
    box = local_box(p)
    if isinstance(src, Tensor):
        block = _read(slice_of(src.name), box)
    else:  # [E, a, b] <- per expert [b, a]
        experts = box[0].tolist() if isinstance(box[0], torch.Tensor) else range(
            box[0].start, box[0].stop)
        block = torch.stack([_read(slice_of(src.pattern.format(e=e)), [box[2], box[1]]).T
                             for e in experts])
    local.copy_(block)


@torch.no_grad()
def load_hf_weights(model: Transformer, path: str | Path, architecture: str | None = None
                    ) -> None:
    """Fill every parameter of ``model`` (materialised, possibly sharded) from the Hugging
    Face checkpoint directory ``path``, casting to each parameter's dtype. The routers' expert
    bias comes from DeepSeek-V3's ``e_score_correction_bias``; every other router buffer
    (counters; the bias of the other families, which Hub checkpoints lack) is zeroed.

    Every name and shape is checked before anything is read: a tensor the model lacks or
    has no use for is an error, except stale rotary buffers and DeepSeek-V3's
    multi-token-prediction layers (``num_nextn_predict_layers`` after the last layer), which
    are skipped: foldmesh does not load MTP weights yet. A pipeline stage loads the
    parameters it holds.

    Raises:
        CheckpointError: a tensor is missing, unexpected or of the wrong shape; no weights.
    """
    path = Path(path)
    arch = architecture or getattr(model, "hf_architecture", None) or infer_architecture(
        model.config)
    files = weight_files(path)
    sources = tensor_map(model.config, arch)
    model.tie_weights()  # to_empty and parallelize replace parameters
    params = {canonical(n): p for n, p in model.named_parameters()}
    for name in params:
        if name not in sources:
            raise CheckpointError(f"foldmesh parameter {name!r} has no counterpart in {arch}; "
                                  "load into a Transformer built from this checkpoint's config")
    for m in model.modules():
        if isinstance(m, Router):
            for b in m.buffers(recurse=False):
                b.zero_()
    # checkpointed buffers (the expert bias) are filled like parameters
    params.update({canonical(n): b for n, b in model.named_buffers() if canonical(n) in sources})
    hf_config = getattr(model, "hf_config", None)
    if hf_config is None and (path / CONFIG_NAME).is_file():
        hf_config = read_config(path)
    _check_names(sources, files, model.config.tie_embeddings, path,
                 lambda hf: mtp_layer(hf, model.config, arch, hf_config or {}))
    with ExitStack() as stack:
        handles = {}

        def slice_of(hf_name: str):
            f = files[hf_name]
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(f, "pt"))
            return handles[f].get_slice(hf_name)

        for name, p in params.items():
            src = sources[name]
            want = src.hf_shape(tuple(p.shape))
            for hf in src.hf_names():
                found = tuple(slice_of(hf).get_shape())
                if found != want:
                    raise CheckpointError(f"checkpoint tensor {hf!r} has shape {found}, "
                                          f"expected {want} for foldmesh parameter {name!r}; "
                                          "check that config.json matches the weights")
        for name, p in params.items():
            _fill(p, sources[name], slice_of)
    model.tie_weights()


def from_pretrained(path: str | Path, mesh=None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", parallelize=None,
                    config_overrides: dict | None = None, **parallel_kwargs) -> Transformer:
    """A ``Transformer`` with the weights of the Hugging Face checkpoint directory ``path``.

    The model is built on the meta device; with a ``mesh`` it is parallelized by
    ``parallelize(model, mesh, **parallel_kwargs)`` (default ``foldmesh.parallelize.parallelize``),
    then materialised on ``device`` and filled, each rank reading only what it holds. Returned
    in eval mode, like transformers' ``from_pretrained``; call ``train()`` to train.

    Args:
        path: local directory with config.json and model.safetensors (or sharded files and
            model.safetensors.index.json).
        mesh: what ``parallelize`` takes (a ``FoldedMesh`` for the default); None: one process.
        dtype: parameter dtype.
        parallelize: ``(model, mesh, **parallel_kwargs) -> model or None``, parallelizing
            in place on the meta device; it may also apply FSDP2 (strided shards are read
            row by row).
        config_overrides: ``ModelConfig`` fields to replace, e.g. ``capacity_factor``.

    Raises:
        CheckpointError: unsupported architecture or setting; missing, extra or misshapen
            tensors; no config.json or weights.
    """
    path = Path(path)
    hf = read_config(path)
    cfg, arch = config_from_hf(hf)
    if config_overrides:
        cfg = replace(cfg, **config_overrides)
    model = Transformer(cfg, device="meta", dtype=dtype)
    if mesh is not None:
        if parallelize is None:
            from ..parallelize import parallelize
        model = parallelize(model, mesh, **parallel_kwargs) or model
    elif parallelize is not None or parallel_kwargs:
        raise CheckpointError(f"from_pretrained got parallelize arguments "
                              f"{sorted(parallel_kwargs) or ['parallelize']} but mesh=None; "
                              "pass a mesh, or drop them to load on one process")
    model.hf_architecture, model.hf_config = arch, hf
    model.to_empty(device=device)
    load_hf_weights(model, path, arch)
    return model.eval()
