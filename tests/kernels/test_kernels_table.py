"""The measured backend table: what "auto" picks from it, and how ``record`` writes it.

Everything runs on the CPU: a CUDA family is faked by patching
``torch.cuda.get_device_capability``, and tables are written to temporary files.
"""

from __future__ import annotations

import importlib.resources
import json
import os

import pytest
import torch
from foldmesh.kernels import _backend, _table, kernel_backend
from foldmesh.kernels._backend import auto_backend
from foldmesh.kernels._table import device_family, measured_backend, record

CUDA = torch.device("cuda", 0)
MIXTRAL_UP = dict(k=4096, n=28672, groups=8, rows=32768)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend device cuda:0 exists with the capability ``gpu(major, minor)`` sets."""

    def use(major: int, minor: int = 0) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (major, minor))
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(_backend, "triton_available", lambda: True)

    use(9, 0)
    return use


def _row(**change) -> dict:
    row = dict(family="sm90", device="NVIDIA H200", date="2026-12-04", torch="2.11.0",
               triton="3.6.0", op="grouped_gemm", k=4096, n=4096, groups=8, rows=32768,
               routing="uniform", ms={"triton": 2.0, "grouped_mm": 1.0}, source="test")  # fmt: skip
    return {**row, **change}


@pytest.fixture
def table(tmp_path, monkeypatch):
    """An empty table file that measured_backend reads instead of the shipped one."""
    path = tmp_path / "table.json"
    monkeypatch.setattr(_table, "TABLE_PATH", path)
    return path


def test_device_family(gpu):
    assert device_family(torch.device("cpu")) == "cpu"
    assert device_family(CUDA) == "sm90"
    gpu(10, 0)
    assert device_family(CUDA) == "sm100"
    gpu(8, 6)
    assert device_family(torch.device("cuda")) == "sm86"


def test_shipped_table_holds_the_h200_ratios(gpu):
    rows = json.loads((importlib.resources.files("foldmesh.kernels")
                       / "backend_table.json").read_text())["rows"]  # fmt: skip
    assert len(rows) == 8 and {r["family"] for r in rows} == {"sm90"}
    for row in rows:
        assert row == _table._validated(row)  # well formed, best is the fastest
        assert row["ms"]["grouped_mm"] == 1.0 and "torch" not in row["ms"]  # not measured
        assert row["ms"]["triton"] == round(1 / row["triton_over_grouped_mm"], 4)
        assert "only the ratio is trustworthy" in row["note"]
    assert measured_backend("grouped_gemm", CUDA, **MIXTRAL_UP) == "grouped_mm"
    assert measured_backend("swiglu_experts", CUDA, k=3584, n=2560, groups=64,
                            rows=131072) == "grouped_mm"  # fmt: skip
    gpu(8, 0)
    assert measured_backend("grouped_gemm", CUDA, **MIXTRAL_UP) is None
    assert measured_backend("grouped_gemm", torch.device("cpu"), **MIXTRAL_UP) is None


def test_nearest_shape_wins(table, gpu):
    record([_row(k=1024, n=1024, ms={"triton": 1.0, "grouped_mm": 1.5}),
            _row(k=8192, n=8192, ms={"triton": 1.5, "grouped_mm": 1.0})], table)  # fmt: skip
    near = dict(groups=8, rows=32768)
    assert measured_backend("grouped_gemm", CUDA, k=768, n=2048, **near) == "triton"
    assert measured_backend("grouped_gemm", CUDA, k=7168, n=6144, **near) == "grouped_mm"
    # Rows per group count too: 8 groups of 4096 rows is nearer to 64 groups of 4096 rows
    # than to 64 groups of 64 rows.
    record([_row(k=2048, n=2048, groups=64, rows=64 * 64, ms={"triton": 1.0, "torch": 3.0}),
            _row(k=2048, n=2048, groups=64, rows=64 * 4096, ms={"torch": 1.0, "triton": 3.0})],
           table)  # fmt: skip
    assert measured_backend("grouped_gemm", CUDA, k=2048, n=2048, groups=64, rows=64 * 3000) \
        == "torch"  # fmt: skip


def test_tied_rows_are_pooled(table, gpu):
    # Uniform routing favours triton by 10 %, Zipf favours grouped_mm by 50 %: pooled, the
    # geometric mean of the relative times picks grouped_mm.
    record([_row(routing="uniform", ms={"triton": 1.0, "grouped_mm": 1.1}),
            _row(routing="zipf", ms={"triton": 1.5, "grouped_mm": 1.0})], table)  # fmt: skip
    assert measured_backend("grouped_gemm", CUDA, k=4096, n=4096, groups=8,
                            rows=32768) == "grouped_mm"  # fmt: skip


def test_swiglu_experts_reads_its_own_rows_or_the_up_projection(table, gpu):
    record(
        [
            _row(k=1024, n=4096, ms={"triton": 1.0, "grouped_mm": 2.0}),  # H 1024, 2F 4096
            _row(k=2048, n=1024, ms={"triton": 2.0, "grouped_mm": 1.0}),
        ],
        table,
    )  # the down
    assert measured_backend("swiglu_experts", CUDA, k=1024, n=2048, groups=8,
                            rows=32768) == "triton"  # fmt: skip
    record([_row(op="swiglu_experts", k=1024, n=2048, ms={"grouped_mm": 1.0, "triton": 1.2})],
           table)  # fmt: skip
    assert measured_backend("swiglu_experts", CUDA, k=1024, n=2048, groups=8,
                            rows=32768) == "grouped_mm"  # fmt: skip
    with pytest.raises(ValueError, match="unknown op"):
        measured_backend("permute", CUDA, k=1, n=1, groups=1, rows=1)


def test_auto_follows_the_table_on_cuda(table, gpu):
    record([_row(k=4096, n=4096, ms={"triton": 2.0, "grouped_mm": 1.0}),
            _row(k=512, n=512, ms={"triton": 1.0, "grouped_mm": 2.0}),
            _row(k=64, n=64, ms={"torch": 1.0, "triton": 2.0})], table)  # fmt: skip
    shape = dict(groups=8, rows=32768)
    bf16 = torch.bfloat16
    assert auto_backend(CUDA, bf16, "grouped_gemm", k=4096, n=4096, **shape) == "grouped_mm"
    assert auto_backend(CUDA, bf16, "grouped_gemm", k=512, n=512, **shape) == "triton"
    assert auto_backend(CUDA, bf16, "grouped_gemm", k=64, n=64, **shape) == "torch"
    assert auto_backend(CUDA, bf16, "swiglu_experts", k=4096, n=2048, **shape) == "grouped_mm"
    assert auto_backend(CUDA, bf16, k=4096, n=4096, **shape) == "triton"  # not a GEMM op
    assert auto_backend(CUDA, torch.float64, "grouped_gemm", k=4096, n=4096, **shape) == "torch"
    assert auto_backend(torch.device("cpu"), bf16, "grouped_gemm", k=4096, n=4096,
                        **shape) == "torch"  # fmt: skip
    gpu(8, 0)  # a family the table does not know: Triton, as before the table
    assert auto_backend(CUDA, bf16, "grouped_gemm", k=4096, n=4096, **shape) == "triton"


def test_kernel_backend_consults_the_table_only_for_auto(monkeypatch):
    asked = []

    def fake_auto(device, dtype, op=None, **dims):
        asked.append((op, dims))
        return "grouped_mm"

    monkeypatch.setattr(_backend, "auto_backend", fake_auto)
    monkeypatch.delenv("FOLDMESH_KERNELS", raising=False)
    x = torch.zeros(48, 16)
    dims = dict(op="grouped_gemm", k=16, n=32, groups=4)
    assert kernel_backend(x, **dims) == "grouped_mm"
    assert asked == [("grouped_gemm", dict(k=16, n=32, groups=4, rows=48))]
    assert kernel_backend(x, "torch", **dims) == "torch"  # the argument wins
    monkeypatch.setenv("FOLDMESH_KERNELS", "torch")
    assert kernel_backend(x, **dims) == "torch"  # the environment wins over auto
    assert len(asked) == 1


def test_record_merges(table):
    assert record([_row(), _row(routing="zipf")], table) == table
    record([_row(ms={"triton": 1.0, "grouped_mm": 3.0}, date="2027-01-01"),
            _row(k=1024, n=1024)], table)  # fmt: skip
    rows = json.loads(table.read_text())["rows"]
    assert len(rows) == 3  # the uniform 4096 row was replaced, the zipf one kept, one added
    replaced = [r for r in rows if r["k"] == 4096 and r["routing"] == "uniform"]
    assert replaced == [{**_row(ms={"triton": 1.0, "grouped_mm": 3.0}, date="2027-01-01"),
                         "best": "triton"}]  # fmt: skip
    assert all(r["best"] == min(r["ms"], key=r["ms"].get) for r in rows)


def test_record_is_atomic(table, monkeypatch):
    record([_row()], table)
    before = table.read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        record([_row(k=1024)], table)
    assert table.read_text() == before
    assert sorted(p.name for p in table.parent.iterdir()) == [table.name]  # no temp file left


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(best="triton"), "fastest ms is 'grouped_mm'"),
        (dict(op="permute"), "op must be one of"),
        (dict(ms={"cublas": 1.0}), "ms must map"),
        (dict(ms={"triton": 0.0}), "ms must map"),
        (dict(k=4096.0), "positive ints"),
    ],
)
def test_record_rejects_bad_rows(table, change, message):
    with pytest.raises(ValueError, match=message):
        record([_row(**change)], table)
    bad = _row()
    del bad["family"]
    with pytest.raises(ValueError, match="lacks"):
        record([bad], table)
    assert not table.exists()
