"""MoE dispatch kernels: permute/unpermute, chunk sort, grouped GEMM and SwiGLU experts.

Each op has a Triton implementation (the default for CUDA tensors) and a pure-torch reference
(the default elsewhere); ``backend=`` or the ``FOLDMESH_KERNELS`` environment variable forces
either. Importing this package never imports Triton. See docs/kernels.md.
"""

from ._backend import kernel_backend
from ._experts import swiglu, swiglu_experts
from ._ops import grouped_gemm, permute, sort_chunks, unpermute
from ._routing import PermuteMap, capacity_for

__all__ = [
    "PermuteMap",
    "capacity_for",
    "grouped_gemm",
    "kernel_backend",
    "permute",
    "sort_chunks",
    "swiglu",
    "swiglu_experts",
    "unpermute",
]
