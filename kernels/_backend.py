"""Backend selection and the lazy Triton import.

Every public op takes ``backend: str | None``. The choice is made in this order:

1. the ``backend`` argument, when it is ``"triton"`` or ``"torch"``;
2. the environment variable ``FOLDMESH_KERNELS`` (``"triton"``, ``"torch"`` or ``"auto"``);
3. auto: ``"triton"`` when Triton imports, the input lives on CUDA and its dtype is one the
   Triton kernels support (float16, bfloat16, float32); ``"torch"`` otherwise.

Forcing ``"triton"`` on CPU tensors is allowed only under ``TRITON_INTERPRET=1`` (the Triton
interpreter), which is how the CPU test suite runs the kernels.

Nothing here imports Triton at module import time: ``foldmesh.kernels`` must import on machines
without Triton, and Triton reads ``TRITON_INTERPRET`` when a kernel is *defined*, so the modules
that define kernels are only imported once a Triton backend has actually been selected.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["kernel_backend", "triton_available", "interpreter_problem", "interpret_mode",
           "ENV_VAR", "BACKENDS"]

ENV_VAR = "FOLDMESH_KERNELS"
BACKENDS = ("triton", "torch")
# dtypes the Triton kernels are written for; tl.dot has no float64 path on Hopper tensor cores.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``import triton`` succeeds (checked once, without importing it eagerly)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        import triton  # noqa: F401
    except Exception:  # a broken or blocked install must not break the torch path
        return False
    return True


@functools.lru_cache(maxsize=1)
def interpreter_problem() -> str | None:
    """Why this Triton's CPU interpreter cannot run foldmesh's kernels, or None if it can.

    NumPy 2.4 turned the conversion of a one-element array to a Python int into an error;
    Triton's interpreter before 3.7 does exactly that for a loaded scalar used as a loop
    bound (every grouped GEMM). Compiled kernels on a GPU are unaffected.
    """
    if not triton_available():
        return "triton cannot be imported"
    import numpy
    import triton

    def version(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("+")[0].split(".")[:2] if x.isdigit())

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter cannot run with NumPy "
                f"{numpy.__version__} (it converts one-element arrays to ints, an error since "
                "NumPy 2.4): install triton>=3.7 or numpy<2.4, or use the torch backend")
    return None


def interpret_mode() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _requested(backend: str | None) -> str:
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    choice = choice.strip().lower() or "auto"
    if choice not in (*BACKENDS, "auto"):
        raise ValueError(
            f"unknown kernel backend {choice!r}: expected 'triton', 'torch', 'auto' or None"
        )
    return choice


def kernel_backend(x: torch.Tensor | None = None, backend: str | None = None) -> str:
    """Resolve the backend (``"triton"`` or ``"torch"``) for an op whose main input is ``x``.

    Args:
        x: the op's main input; its device and dtype drive the automatic choice.
        backend: ``"triton"``, ``"torch"``, ``"auto"`` or None (None defers to the environment).

    Raises:
        RuntimeError: ``"triton"`` was forced but Triton is missing, or ``x`` is a CPU tensor and
            the Triton interpreter is off.
    """
    choice = _requested(backend)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        usable = (
            x is not None
            and x.is_cuda
            and (not x.is_floating_point() or x.dtype in TRITON_DTYPES)
            and triton_available()
        )
        return "triton" if usable else "torch"
    if not triton_available():
        raise RuntimeError("kernel backend 'triton' was requested but triton cannot be imported")
    if x is not None and not x.is_cuda and not interpret_mode():
        raise RuntimeError(
            "kernel backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 "
            "(set it before foldmesh.kernels launches its first kernel)"
        )
    if x is not None and not x.is_cuda and (problem := interpreter_problem()) is not None:
        raise RuntimeError(f"kernel backend 'triton' on CPU tensors: {problem}")
    return "triton"


def check_triton_dtype(*tensors: torch.Tensor) -> None:
    """Reject float dtypes the Triton GEMM kernels do not implement, with a clear message."""
    for t in tensors:
        if t.is_floating_point() and t.dtype not in TRITON_DTYPES:
            raise TypeError(
                f"the triton backend supports {TRITON_DTYPES}, got {t.dtype}; "
                "use backend='torch' (e.g. for float64 gradcheck)"
            )
