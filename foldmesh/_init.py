"""Initial weights of a parallelized model that do not depend on the fold.

On CPU, DTensor draws random values shard by shard from each rank's own generator (it has no
offset-based generator there), so ``model.init_weights()`` on a parallel model gives values
that depend on the tensor-parallel layout: two folds of one run would start from different
weights. ``init_weights`` draws, part by part, the whole model's tensors as one process would
(``Transformer.init_weights(seed)``) and keeps this rank's block of each. On CUDA DTensor's
offset-based generator already gives every shard its part of the whole tensor, so there each
part is initialised in place.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .models import Transformer
from .models.model import part_seed

_WRAPPED = "_checkpoint_wrapped_module."


def local_block(t: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's block of ``full`` (the global value of ``t``), as ``t`` holds it: all of it
    for a plain tensor, the local shard for a DTensor."""
    if not isinstance(t, DTensor):
        return full
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Initialise a parallelized (and materialised) ``model`` or pipeline stage with the
    values ``Transformer(cfg).init_weights(seed)`` gives on one process, whatever the fold.

    Call it after ``foldmesh.parallelize`` and ``to_empty``, before data parallelism (FSDP's
    strided shards are not handled). On CPU it holds one part (the embedding, a layer, the
    head) unsharded at a time.
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        model.init_weights(seed=seed)
        return
    cfg = model.config
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        plain = Transformer(cfg, dtype=dtype)
    places = dict(plain.parts())
    for place, part in model.parts():
        if part is model.lm_head and cfg.tie_embeddings:
            continue  # the embedding's weight, drawn with the embedding
        ref = places[place].to_empty(device="cpu")
        torch.manual_seed(part_seed(seed, place))
        plain.init_part(ref)
        full = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
        for name, t in [*part.named_parameters(), *part.named_buffers()]:
            src = full[name.replace(_WRAPPED, "")]
            local = t.to_local() if isinstance(t, DTensor) else t
            local.copy_(local_block(t, src))
        places[place] = None  # release the unsharded part
    model.tie_weights()
