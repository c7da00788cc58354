"""The repository's `kernels/` folder is foldmesh.kernels only, never a top-level `kernels`.

The import name `kernels` belongs to Hugging Face's kernel hub, which transformers imports.
Python puts the working directory first on sys.path for `python -m ...`, `python -c` and a
notebook, so these checks run in a subprocess whose working directory is the repository root.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _hub_distribution_root() -> Path | None:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("kernels")).resolve()


def test_top_level_kernels_is_not_this_repository():
    out = _run("import sys, kernels\n"
               "assert sys.path[0] == '', sys.path[0]\n"
               "print(kernels.__file__)")
    hub = _hub_distribution_root()
    if hub is None:
        # Without the hub the name must not exist at all, as in any other directory.
        assert out.returncode != 0
        assert "No module named 'kernels'" in out.stderr, out.stderr
        return
    assert out.returncode == 0, out.stderr
    found = Path(out.stdout.strip()).resolve()
    assert not found.is_relative_to(ROOT), found
    assert found.is_relative_to(hub), (found, hub)


def test_top_level_kernels_missing_raises_module_not_found():
    # Hide every installed copy: only the repository (on sys.path as '') remains.
    out = _run("import sys\n"
               "sys.path[:] = [p for p in sys.path if p == '' or 'packages' not in p]\n"
               "try:\n"
               "    import kernels\n"
               "except ModuleNotFoundError as e:\n"
               "    print('missing', e.name)\n"
               "    assert 'kernels' not in sys.modules\n"
               "else:\n"
               "    print('found', kernels.__file__)\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["missing", "kernels"], out.stdout


def test_transformers_imports_hub_kernels_from_the_root():
    pytest.importorskip("transformers")
    if _hub_distribution_root() is None:
        pytest.skip("Hugging Face's kernels distribution is not installed")
    out = _run("from transformers.integrations import hub_kernels\n"
               "import kernels\n"
               "from kernels import CUDAProperties\n"
               "import foldmesh.kernels as fk\n"
               "print(fk.__name__, fk.grouped_gemm.__module__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["foldmesh.kernels", "foldmesh.kernels._ops"], out.stdout
