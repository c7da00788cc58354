"""Make ``foldmesh`` and ``foldmesh.kernels`` importable from this checkout, installed or not.

``pip install -e .`` maps the top-level ``kernels/`` folder to ``foldmesh.kernels``. A GPU
machine may run a bare copy of the tree instead (no install, no network): ``boot()`` puts the
repository root first on ``sys.path`` and adds a finder that maps ``foldmesh.kernels`` to
``kernels/`` exactly as the editable install does. An installed mapping, when there is one,
is found first and wins.

Run as a script it starts a module the way ``python -m`` does, after ``boot()``::

    python scripts/_bench_boot.py foldmesh.train --config configs/single_gpu.toml
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """``foldmesh.kernels`` -> ``<root>/kernels`` (its submodules follow through __path__)."""

    def find_spec(self, name, path=None, target=None):
        if name != "foldmesh.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(KERNELS, "__init__.py"), submodule_search_locations=[KERNELS])


def boot() -> None:
    """Idempotent: the root first on ``sys.path`` and the ``foldmesh.kernels`` finder last on
    ``sys.meta_path``. Child processes that import foldmesh start through this file too."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if not any(isinstance(f, _KernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(_KernelsFinder())


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/_bench_boot.py MODULE [ARGS...]")
    boot()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
