"""The grouped GEMM's autotuning: stable keys, shape-based pruning, Triton's on-disk cache.

The Hopper candidate lists are pruned here with stand-ins for the launch arguments, so no
kernel runs; the interpreter itself uses one small config and never tunes.
"""

from __future__ import annotations

import inspect

import pytest
from kernels_naive import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton missing")


class _Tensor:
    """What the prune functions read from the ``x_ptr`` argument."""

    def __init__(self, element_size: int, cuda: bool = True):
        self._size, self.is_cuda = element_size, cuda

    def element_size(self) -> int:
        return self._size

    class device:  # noqa: N801 - mimics torch.Tensor.device
        index = 0


@pytest.fixture
def gg(monkeypatch):
    from foldmesh.kernels import _grouped_gemm

    monkeypatch.setattr(_grouped_gemm, "_shared_memory", lambda index: 232448)  # H100/H200
    monkeypatch.delenv("FOLDMESH_AUTOTUNE", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # _configs builds the Hopper candidates
    fwd = _grouped_gemm._configs(_grouped_gemm._FWD_NAMES, _grouped_gemm._FWD_HOPPER, (0,) * 4)
    wgrad = _grouped_gemm._configs(_grouped_gemm._WGRAD_NAMES, _grouped_gemm._WGRAD_HOPPER,
                                   (0,) * 3)  # fmt: skip
    monkeypatch.delenv("TRITON_INTERPRET")
    return _grouped_gemm, fwd, wgrad


def _tiles(configs) -> list[tuple]:
    return [(*c.kwargs.values(), c.num_warps, c.num_stages) for c in configs]


def test_keys_are_weight_dims(gg):
    module, _, _ = gg
    for kernel in (module._grouped_gemm_kernel, module._grouped_wgrad_kernel):
        assert list(kernel.keys) == ["K", "M", "G"]  # never N, the token count


def test_bf16_keeps_every_tile_that_fits(gg):
    module, fwd, wgrad = gg
    args = dict(x_ptr=_Tensor(2), K=4096, M=14336, N=32768)
    assert module._prune_fwd(fwd, args) == fwd
    assert module._prune_wgrad(wgrad, args) == wgrad


def test_float32_drops_tiles_that_overflow_shared_memory(gg):
    module, fwd, wgrad = gg
    args = dict(x_ptr=_Tensor(4), K=1024, M=4096)
    # stages * (BLOCK_M + BLOCK_N) * BLOCK_K * 4 bytes must fit in 227 KiB
    assert _tiles(module._prune_fwd(fwd, args)) == [(128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 3)]
    assert _tiles(module._prune_wgrad(wgrad, args)) == [(128, 128, 32, 4, 4), (64, 128, 64, 4, 4)]


def test_tiles_larger_than_the_problem_are_dropped(gg):
    module, fwd, wgrad = gg
    narrow = module._prune_fwd(fwd, dict(x_ptr=_Tensor(2), K=4096, M=100))
    assert _tiles(narrow) == [(128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4),
                              (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 3)]  # fmt: skip
    # Nothing fits a 3 x 5 problem: the smallest tile is kept, never an empty list.
    assert _tiles(module._prune_fwd(fwd, dict(x_ptr=_Tensor(2), K=3, M=5))) == \
        [(128, 64, 64, 8, 4, 4)]  # fmt: skip
    assert len(module._prune_wgrad(wgrad, dict(x_ptr=_Tensor(4), K=3, M=5))) == 1
    # Under the interpreter (a CPU tensor) there is no shared-memory limit to apply.
    assert module._prune_fwd(fwd, dict(x_ptr=_Tensor(4, cuda=False), K=4096, M=4096)) == fwd


def test_autotune_off_keeps_the_first_fitting_tile(gg, monkeypatch):
    module, fwd, _ = gg
    monkeypatch.setenv("FOLDMESH_AUTOTUNE", "0")
    assert _tiles(module._prune_fwd(fwd, dict(x_ptr=_Tensor(4), K=1024, M=4096))) == \
        [(128, 64, 64, 8, 4, 4)]  # fmt: skip


def test_results_are_cached_on_disk_where_triton_can(gg, monkeypatch):
    import triton

    module, fwd, _ = gg
    seen = {}

    def autotune(configs, key, prune_configs_by=None, cache_results=False):
        seen.update(key=key, cache_results=cache_results, prune=prune_configs_by)
        return lambda fn: fn

    monkeypatch.setattr(triton, "autotune", autotune)
    module._autotune(fwd, module._prune_fwd)
    assert seen == dict(key=["K", "M", "G"], cache_results=True,
                        prune={"early_config_prune": module._prune_fwd})  # fmt: skip

    def old_autotune(configs, key, prune_configs_by=None):  # a Triton before 3.2
        seen.update(key=key, cache_results=None)
        return lambda fn: fn

    monkeypatch.setattr(triton, "autotune", old_autotune)
    module._autotune(fwd, module._prune_fwd)
    assert seen["cache_results"] is None
    assert "cache_results" in inspect.signature(autotune).parameters
