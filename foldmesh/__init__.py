"""foldmesh: MoE Parallel Folding on PyTorch's DeviceMesh and DTensor.

Attention layers run on one mapping of the ranks (tp x cp x dp x pp) and MoE layers on
another (etp x ep x edp x pp); both are views of one device mesh.
"""

from ._fold import ATTN_AXES, MOE_AXES, Fold, FoldError
from ._mesh import FLATTENED, FoldedMesh, build_folded_mesh
from ._transition import to_attn, to_moe

__all__ = [
    "ATTN_AXES",
    "FLATTENED",
    "MOE_AXES",
    "Fold",
    "FoldError",
    "FoldedMesh",
    "build_folded_mesh",
    "to_attn",
    "to_moe",
]
