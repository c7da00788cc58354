"""Backend selection, capacity_for, the test device, and importing foldmesh.kernels without Triton.

The selection tests use CPU tensors on purpose: they check what each setting means for a CPU
input, on any machine (the CUDA side of "auto" is tested through ``auto_backend`` in
test_kernels_table.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from foldmesh.kernels import capacity_for, kernel_backend
from foldmesh.kernels._backend import interpreter_problem
from kernels_naive import HAS_TRITON, choose_device


@pytest.mark.parametrize(
    ("tokens", "experts", "topk", "factor", "expected"),
    [(10, 4, 2, 1.0, 5), (10, 4, 2, 1.25, 7), (0, 8, 2, 1.0, 0), (7, 64, 8, 1.0, 1)],
)
def test_capacity_for(tokens, experts, topk, factor, expected):
    assert capacity_for(tokens, experts, topk, factor) == expected


def test_capacity_for_rejects_bad_arguments():
    with pytest.raises(ValueError):
        capacity_for(10, 4, 2, 0.0)
    with pytest.raises(ValueError):
        capacity_for(10, 0, 2, 1.0)


def test_selection_order(monkeypatch):
    x = torch.zeros(2, 2)
    monkeypatch.delenv("FOLDMESH_KERNELS", raising=False)
    assert kernel_backend(x) == "torch"  # auto on CPU
    assert kernel_backend(x, "torch") == "torch"
    monkeypatch.setenv("FOLDMESH_KERNELS", "torch")
    assert kernel_backend(x, "auto") == "torch"
    monkeypatch.setenv("FOLDMESH_KERNELS", "auto")
    assert kernel_backend(x) == "torch"
    monkeypatch.setenv("FOLDMESH_KERNELS", "cuda")
    with pytest.raises(ValueError):
        kernel_backend(x)


def test_grouped_mm_is_for_the_grouped_gemms_only(monkeypatch):
    x = torch.zeros(2, 2)
    monkeypatch.delenv("FOLDMESH_KERNELS", raising=False)
    assert kernel_backend(x, "grouped_mm", op="grouped_gemm") == "grouped_mm"
    assert kernel_backend(x, "grouped_mm", op="swiglu_experts") == "grouped_mm"
    with pytest.raises(ValueError, match="exists only for"):
        kernel_backend(x, "grouped_mm")  # permute, unpermute, sort_chunks, swiglu
    monkeypatch.setenv("FOLDMESH_KERNELS", "grouped_mm")
    assert kernel_backend(x, op="grouped_gemm") == "grouped_mm"
    assert kernel_backend(x) == "torch"  # the environment leaves the other ops on auto
    assert kernel_backend(x, "torch", op="grouped_gemm") == "torch"  # the argument wins


def test_choose_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device() == torch.device("cpu")


# Forcing triton on a CPU tensor needs the interpreter, on a GPU machine too.
_INTERPRETER_SKIP = "triton missing" if not HAS_TRITON else interpreter_problem()


@pytest.mark.skipif(_INTERPRETER_SKIP is not None, reason=str(_INTERPRETER_SKIP))
def test_forcing_triton(monkeypatch):
    x = torch.zeros(2, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FOLDMESH_KERNELS", "triton")
    assert kernel_backend(x) == "triton"
    assert kernel_backend(x, "torch") == "torch"  # the argument wins over the environment
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernel_backend(x)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FOLDMESH_KERNELS", "TRITON_INTERPRET")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


_BLOCK_TRITON = """
    import importlib.abc, sys

    class BlockTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError(f"{name} is hidden by the test")

    sys.meta_path.insert(0, BlockTriton())
"""

_USE_EVERY_OP = """
    import sys, torch
    import foldmesh.kernels as K

    assert "triton" not in sys.modules, "importing foldmesh.kernels imported triton"
    x = torch.randn(6, 4, requires_grad=True)
    idx = torch.tensor([[0, 1]] * 6)
    probs = torch.full((6, 2), 0.5)
    perm = K.permute(x, idx, probs, 3)
    h = K.swiglu_experts(perm.tokens, torch.randn(3, 4, 8), torch.randn(3, 4, 4), perm.counts)
    h = h + K.swiglu_experts(perm.tokens, torch.randn(3, 4, 8), torch.randn(3, 4, 4), perm.counts,
                             backend="grouped_mm")
    out = K.unpermute(K.sort_chunks(h, perm.counts, 1, 3), perm, probs)
    out.sum().backward()
    assert x.grad is not None and "triton" not in sys.modules
"""


def test_import_and_ops_without_triton():
    result = _run(
        _BLOCK_TRITON
        + _USE_EVERY_OP
        + """
    try:
        K.kernel_backend(x, "triton")
    except RuntimeError as err:
        assert "cannot be imported" in str(err)
    else:
        raise AssertionError("forcing triton without triton must fail")
    print("ok")
    """
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_import_does_not_load_triton():
    result = _run(_USE_EVERY_OP + "\n    print('ok')\n")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton missing")
def test_an_interpreter_that_cannot_run_names_the_fix(monkeypatch):
    import numpy
    import triton
    from foldmesh.kernels._backend import interpreter_problem

    check = interpreter_problem.__wrapped__  # uncached
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert "install triton>=3.7 or numpy<2.4" in check()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert check() is None
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert check() is None
