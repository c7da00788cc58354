"""foldmesh: MoE Parallel Folding on PyTorch's DeviceMesh and DTensor.

Attention layers run on one mapping of the ranks (tp x cp x dp x pp) and MoE layers on
another (etp x ep x edp x pp); both are views of one device mesh.
"""

from ._fold import ATTN_AXES, MOE_AXES, Fold, FoldError
from ._init import init_weights
from ._mesh import FLATTENED, FoldedMesh, build_folded_mesh
from ._sequence import distribute_tokens, natural_order, sequence_order
from ._transition import to_attn, to_moe
from .data_parallel import apply_fsdp, clip_grad_norm_, grad_norm, reduce_gradients
from .hf import from_pretrained, save_pretrained
from .loss import cross_entropy
from .parallelize import parallelize

__all__ = [
    "ATTN_AXES",
    "FLATTENED",
    "MOE_AXES",
    "Fold",
    "FoldError",
    "FoldedMesh",
    "apply_fsdp",
    "build_folded_mesh",
    "clip_grad_norm_",
    "cross_entropy",
    "distribute_tokens",
    "from_pretrained",
    "grad_norm",
    "init_weights",
    "natural_order",
    "parallelize",
    "reduce_gradients",
    "save_pretrained",
    "sequence_order",
    "to_attn",
    "to_moe",
]
