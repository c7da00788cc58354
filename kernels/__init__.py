"""MoE dispatch kernels: permute/unpermute, chunk sort, grouped GEMM and SwiGLU experts.

Each op has a Triton implementation (the default for CUDA tensors) and a pure-torch reference
(the default elsewhere); ``backend=`` or the ``FOLDMESH_KERNELS`` environment variable forces
either. Importing this package never imports Triton. See docs/kernels.md.

This folder is only ever ``foldmesh.kernels``. The import name ``kernels`` belongs to another
distribution (Hugging Face's kernel hub, which transformers imports). Python finds this folder
under that name whenever the repository root is on ``sys.path`` (``python -m pytest``, a
notebook or a script started in the root), so when it is imported as anything else it hands
the name to whatever the rest of ``sys.path`` holds, or fails exactly as if the folder were
not there. It imports nothing of its own in that case.
"""

if __name__ != "foldmesh.kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        del _sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = _util.module_from_spec(_spec)
    # The import system returns whatever sys.modules holds after this file runs, so the
    # importer receives the real package, and its submodules resolve against its own path.
    _sys.modules[__name__] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del _sys.modules[__name__]
        raise
else:
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
