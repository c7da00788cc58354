"""Backend selection and the lazy Triton import.

Every public op takes ``backend: str | None``. The choice is made in this order:

1. the ``backend`` argument, when it is ``"triton"``, ``"torch"`` or ``"grouped_mm"``;
2. the environment variable ``FOLDMESH_KERNELS`` (``"triton"``, ``"torch"``, ``"grouped_mm"``
   or ``"auto"``);
3. auto: ``"torch"`` unless the input lives on CUDA in a dtype the Triton kernels support
   (float16, bfloat16, float32). On CUDA, the grouped GEMMs (``grouped_gemm``,
   ``swiglu_experts``) take the backend measured fastest for this GPU family at the nearest
   shape in the shipped table (``_table.measured_backend``); without a row for the family,
   and for every other op, ``"triton"`` when Triton imports, ``"torch"`` otherwise. Nothing is
   timed at run time.

``"grouped_mm"`` (``torch._grouped_mm``, see ``_grouped_mm``) exists only for the grouped GEMMs:
passing it to another op raises, while ``FOLDMESH_KERNELS=grouped_mm`` leaves the other ops on
auto. Forcing ``"triton"`` on CPU tensors is allowed only under ``TRITON_INTERPRET=1`` (the
Triton interpreter), which is how the CPU test suite runs the kernels.

Nothing here imports Triton at module import time: ``foldmesh.kernels`` must import on machines
without Triton, and Triton reads ``TRITON_INTERPRET`` when a kernel is *defined*, so the modules
that define kernels are only imported once a Triton backend has actually been selected.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["kernel_backend", "auto_backend", "triton_available", "interpreter_problem",
           "interpret_mode", "ENV_VAR", "BACKENDS", "GEMM_OPS"]

ENV_VAR = "FOLDMESH_KERNELS"
BACKENDS = ("triton", "torch", "grouped_mm")
# The ops "grouped_mm" and the measured table apply to.
GEMM_OPS = ("grouped_gemm", "swiglu_experts")
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


def _requested(backend: str | None, op: str | None) -> str:
    from_env = backend is None
    choice = os.environ.get(ENV_VAR, "auto") if from_env else backend
    choice = choice.strip().lower() or "auto"
    if choice not in (*BACKENDS, "auto"):
        raise ValueError(
            f"unknown kernel backend {choice!r}: expected 'triton', 'torch', 'grouped_mm', "
            "'auto' or None"
        )
    if choice == "grouped_mm" and op not in GEMM_OPS:
        if from_env:
            return "auto"  # FOLDMESH_KERNELS=grouped_mm picks the GEMM backend only
        raise ValueError(
            f"kernel backend 'grouped_mm' (torch._grouped_mm) exists only for {GEMM_OPS}; "
            "pass 'triton', 'torch' or 'auto' to the row-moving ops and swiglu"
        )
    return choice


def auto_backend(
    device: torch.device,
    dtype: torch.dtype,
    op: str | None = None,
    *,
    k: int | None = None,
    n: int | None = None,
    groups: int | None = None,
    rows: int | None = None,
) -> str:
    """What ``"auto"`` means for an op whose main input has this device and dtype.

    Args:
        device, dtype: of the op's main input.
        op: ``"grouped_gemm"`` or ``"swiglu_experts"`` to consult the measured table, with
            k, n, groups (the weight dims: K, M, G for grouped_gemm; H, F, G for
            swiglu_experts) and rows (N, the rows of x); None for the other ops.

    Returns:
        ``"torch"`` off CUDA or for other dtypes; on CUDA the table's answer for the grouped
        GEMMs, else ``"triton"`` (``"torch"`` when Triton does not import).
    """
    if torch.device(device).type != "cuda" or (dtype.is_floating_point
                                               and dtype not in TRITON_DTYPES):  # fmt: skip
        return "torch"
    fallback = "triton" if triton_available() else "torch"
    if op in GEMM_OPS and None not in (k, n, groups, rows):
        from ._table import measured_backend

        best = measured_backend(op, device, k=k, n=n, groups=groups, rows=rows)
        if best in ("grouped_mm", "torch"):
            return best
    return fallback


def kernel_backend(
    x: torch.Tensor | None = None,
    backend: str | None = None,
    *,
    op: str | None = None,
    k: int | None = None,
    n: int | None = None,
    groups: int | None = None,
) -> str:
    """Resolve the backend (``"triton"``, ``"torch"`` or ``"grouped_mm"``) for an op on ``x``.

    Args:
        x: the op's main input; its device, dtype and row count drive the automatic choice.
        backend: ``"triton"``, ``"torch"``, ``"grouped_mm"``, ``"auto"`` or None (None defers
            to the environment).
        op: ``"grouped_gemm"`` or ``"swiglu_experts"`` for the grouped GEMMs (which accept
            ``"grouped_mm"`` and read the measured table), with their weight dims k, n,
            groups (see ``auto_backend``); None for the other ops.

    Raises:
        ValueError: an unknown backend, or ``"grouped_mm"`` passed to an op other than the
            grouped GEMMs.
        RuntimeError: ``"triton"`` was forced but Triton is missing, or ``x`` is a CPU tensor and
            the Triton interpreter is off.
    """
    choice = _requested(backend, op)
    if choice in ("torch", "grouped_mm"):
        return choice  # grouped_mm checks its own rules and falls back with a logged reason
    if choice == "auto":
        if x is None:
            return "torch"
        rows = x.shape[0] if x.dim() > 0 else None
        return auto_backend(x.device, x.dtype, op, k=k, n=n, groups=groups, rows=rows)
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
