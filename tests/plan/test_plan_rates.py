"""foldmesh's measured kernel rates: the record's schema, its loader and atomic writer, the
H200 record against the measurement it was derived from, and the time model reading it
(``kernels="foldmesh"``) or the paper's calibrated fractions (``kernels="megatron"``)."""

import json
import math

import pytest

from foldmesh import FoldError
from foldmesh.models import preset
from foldmesh.plan import Workload, estimate, from_train_config, hardware
from foldmesh.plan._hardware import HARDWARE
from foldmesh.plan._rates import (
    KEYS,
    RATES_DIR,
    check_rates,
    load_rates,
    save_rates,
    shape_class,
)
from foldmesh.plan._time import layer_work
from foldmesh.plan._workload import Layout
from foldmesh.train import load_config

SINGLE_GPU = ["--config", "configs/single_gpu.toml"]


def single_gpu(hw):
    workload, layout = from_train_config(load_config(SINGLE_GPU), 1, "cuda")
    return estimate(workload, layout, hw)


def test_shape_classes_by_the_smallest_dimension():
    assert shape_class(255, 4096, 4096) == "small"
    assert shape_class(256, 4096, 4096) == "medium"
    assert shape_class(2047.5, 4096, 4096) == "medium"
    assert shape_class(2048, 4096, 4096) == "large"
    assert shape_class(1e6, 128, 1e6) == shape_class(1e6, 1e6, 128) == "small"
    assert shape_class(4096, 7168, 2048) == "large"


def test_the_h200_record_follows_from_the_measurement():
    """Every H200 figure recomputed from the 2026-12-04 report's numbers, as its notes say;
    a changed figure must change the derivation here and in docs/planner.md."""
    r = load_rates("h200")
    assert list(r) == list(KEYS) and r["gpu"] == "NVIDIA H200" and r["date"] == "2026-12-04"
    dense, copy = 761, 4251  # measured, unshared
    assert (r["dense_gemm_tflops"], r["copy_gbps"]) == (dense, copy)
    # Triton / dense ratios, uniform routing: (up fwd, up fwd+bwd, down fwd, down fwd+bwd)
    ratios = {"Mixtral-8x7B": (1.01, 0.73, 0.72, 0.75), "Qwen2-57B-A14B": (0.77, 0.73, 0.63,
                                                                           0.71)}
    # both are "large": T·k/E rows per expert at T = 16384, and the smaller of H, F
    assert shape_class(16384 * 2 / 8, 4096, 14336) == shape_class(16384 * 8 / 64, 3584,
                                                                   2560) == "large"

    def per_flop(up, down):  # time per FLOP over dense's: gate and up 2/3 of the FLOPs
        return 2 / 3 / up + 1 / 3 / down

    fwd = sum(per_flop(u, d) for u, _, d, _ in ratios.values()) / 2
    both = sum(per_flop(u, d) for _, u, _, d in ratios.values()) / 2
    bwd = (3 * both - fwd) / 2  # backward has twice the forward's FLOPs
    g = r["grouped_gemm_tflops"]
    assert g["fwd"]["large"] == round(dense / fwd) == 604
    assert g["bwd"]["large"] == round(dense / bwd) == 534
    # medium: the DeepSeek-V3-like layer, 282 TFLOP/s over fwd + bwd, split as large's
    assert shape_class(8192 * 8 / 256, 7168, 2048) == "medium"
    b_over_f = fwd / bwd
    medium_fwd = 282 * (1 + 2 / b_over_f) / 3
    assert g["fwd"]["medium"] == round(medium_fwd)
    assert g["bwd"]["medium"] == round(b_over_f * medium_fwd)
    assert 3 / (1 / g["fwd"]["medium"] + 2 / g["bwd"]["medium"]) == pytest.approx(282, 1e-2)
    # small: an estimate, medium times the shape curve from 256 to 128 rows
    shrink = (128 / (128 + 256)) / (256 / (256 + 256))
    assert g["fwd"]["small"] == round(shrink * medium_fwd)
    assert g["bwd"]["small"] == round(shrink * b_over_f * medium_fwd)
    # permute 48%, unpermute 96% of copy (Mixtral shapes), equal bytes
    assert r["permute_gbps"] == round(2 / (1 / 0.48 + 1 / 0.96) * copy)
    # flash attention: 15 ms of a single_gpu step, the planner's causal FLOPs x 3
    flops = 3 * 12 * 2 * 16 * 2048 ** 2 * 64 * 16
    assert r["attention_tflops"] == round(flops / 0.015 / 1e12)
    assert r["elementwise_gbps"] == round(0.7 * 4800)  # an estimate: the calibrated fraction
    for word in ("bf16", "NOT MEASURED", "estimate", "shared", "lower bound"):
        assert word in r["notes"], word


def test_presets_with_and_without_measured_rates():
    assert [k for k, hw in HARDWARE.items() if hw.rates] == ["h200"]
    assert {load_rates(k) is None for k in ("h100", "b200", "a100")} == {True}
    h200 = hardware("h200")
    assert h200.kernels == "foldmesh" and h200.rates.grouped("medium") == 307e12
    assert h200.rates.grouped("large", backward=True) == 534e12
    assert hardware("h200", kernels="megatron").rates is None
    assert hardware("h200", kernels="megatron") == HARDWARE["h200"].replace(rates=None)
    assert hardware("h100") == hardware("h100", kernels="megatron") == HARDWARE["h100"]
    assert "calibrated" in hardware("h100").describe_kernels()
    assert "measured for: h200" in hardware("h100").describe_kernels()
    assert "NVIDIA H200 (2026-12-04; bf16)" in h200.describe_kernels()


def test_bad_kernels_and_unused_fractions_name_the_fix(tmp_path):
    with pytest.raises(FoldError, match="--kernels 'cudnn'"):
        hardware("h200", kernels="cudnn")
    with pytest.raises(FoldError, match="matmul_efficiency has no effect.*--kernels megatron"):
        hardware("h200", matmul_efficiency=0.5)
    assert hardware("h200", kernels="megatron", matmul_efficiency=0.5).matmul_efficiency == 0.5
    assert hardware("h100", matmul_efficiency=0.5).matmul_efficiency == 0.5  # no rates
    gpu = tmp_path / "mine.toml"
    gpu.write_text('preset = "h200"\nkernels = "megatron"\nmemory_efficiency = 0.6\n')
    hw = hardware(str(gpu))
    assert hw.rates is None and hw.memory_efficiency == 0.6 and hw.name == "mine"
    gpu.write_text('preset = "h200"\nmemory_efficiency = 0.6\n')
    with pytest.raises(FoldError, match="memory_efficiency has no effect"):
        hardware(str(gpu))


def test_save_and_load_round_trip_atomically(tmp_path, monkeypatch):
    rates = {k: v for k, v in load_rates("h200").items() if k not in ("source", "date")}
    path = save_rates(rates, "bench_gpu.py test", tmp_path / "x" / "h200.json")
    assert path == tmp_path / "x" / "h200.json" and list(path.parent.iterdir()) == [path]
    assert path.stat().st_mode & 0o777 == 0o644
    back = json.loads(path.read_text())
    assert list(back) == list(KEYS) and back["source"] == "bench_gpu.py test"
    assert back["date"] == __import__("datetime").date.today().isoformat()
    # the default path is the preset's file, found in the device name
    monkeypatch.setattr("foldmesh.plan._rates.RATES_DIR", tmp_path)
    assert save_rates(rates | {"gpu": "NVIDIA H100 80GB HBM3"}, "s") == tmp_path / "h100.json"
    with pytest.raises(FoldError, match="names no hardware preset; pass path="):
        save_rates(rates | {"gpu": "NVIDIA T4"}, "s")
    # a record that fails its check is not written, and the old file stays whole
    before = path.read_text()
    with pytest.raises(FoldError, match="permute_gbps must be a positive number"):
        save_rates(rates | {"permute_gbps": -1}, "s", path)
    assert path.read_text() == before and list(path.parent.iterdir()) == [path]
    assert RATES_DIR.name == "rates"


@pytest.mark.parametrize("change, message", [
    ({"copy_gbps": None}, "missing \\['copy_gbps'\\]"),
    ({"torch": "2.11"}, "unknown \\['torch'\\] \\(put anything else in 'notes'\\)"),
    ({"attention_tflops": math.inf}, "attention_tflops must be a positive number"),
    ({"dense_gemm_tflops": True}, "dense_gemm_tflops must be a positive number"),
    ({"date": "4 Dec 2026"}, "is not YYYY-MM-DD"),
    ({"gpu": 200}, "gpu must be a string"),
    ({"grouped_gemm_tflops": {"fwd": {"large": 1}, "bwd": {"large": 1}}},
     "each with the shape classes"),
    ({"grouped_gemm_tflops": {"fwd": {"small": 1, "medium": 1, "large": 1},
                              "bwd": {"small": 1, "medium": 0, "large": 1}}},
     "grouped_gemm_tflops.bwd.medium must be a positive number"),
])
def test_bad_records_name_the_field(change, message):
    rates = load_rates("h200") | change
    rates = {k: v for k, v in rates.items() if v is not None}
    with pytest.raises(FoldError, match=message):
        check_rates(rates)


def test_grouped_gemms_take_the_rate_of_their_shape_class():
    hw = hardware("h200")
    work = Workload(preset("mixtral-8x22b", capacity_factor=1.0), 256, 4096)
    from foldmesh import Fold

    fold = Fold(tp=2, ep=8).resolve(16)
    w = layer_work(work.model, fold, work, 1, 0, hw.gemm_half_size)
    # one expert per rank gets the rank's 2048 tokens x top-2 = 4096 rows; H 6144, F 16384
    (cls, flops, _), = w.grouped
    assert cls == "large" and flops == pytest.approx(3 * 2 * 4096 * 6144 * 16384)
    assert w.attention > 0 and 0 < w.permute < w.bytes
    # the whole step splits into its kernels, which add up to the compute
    e = estimate(work, Layout(fold, micro_batch=1), hw)
    assert sum(e.compute_parts.values()) == pytest.approx(e.time["compute"], rel=1e-12)
    assert {"grouped GEMMs fwd (large)", "grouped GEMMs bwd (large)"} <= set(e.compute_parts)


def test_single_gpu_at_foldmesh_and_at_megatron_rates():
    """configs/single_gpu.toml on one H200: the calibrated fractions give what the
    2026-12-04 report quotes (0.10 s, 41.0% MFU); foldmesh's rates reproduce its measured
    15 ms of flash attention, and its grouped GEMMs (8192 rows per expert, H 1024, F 2048)
    are "medium"."""
    mega = single_gpu(hardware("h200", kernels="megatron"))
    assert round(mega.step_time, 2) == 0.10 and round(100 * mega.mfu, 1) == 41.0
    assert sum(mega.compute_parts.values()) == pytest.approx(mega.time["compute"], rel=1e-12)
    ours = single_gpu(hardware("h200"))
    assert ours.compute_parts["attention"] == pytest.approx(0.015, rel=1e-3)
    assert {k for k in ours.compute_parts if "grouped" in k} == {
        "grouped GEMMs fwd (medium)", "grouped GEMMs bwd (medium)"}
    assert sum(ours.compute_parts.values()) == pytest.approx(ours.time["compute"], rel=1e-12)
    assert ours.step_time == sum(ours.time.values())
    assert ours.largest_term()[0] == "grouped GEMMs bwd (medium)"
    assert ours.step_time > mega.step_time  # foldmesh's kernels are slower than Megatron's
    assert ours.to_dict()["kernels"] == "foldmesh" and mega.to_dict()["kernels"] == "megatron"


def test_cli_kernels_flag(capsys, tmp_path):
    from foldmesh.plan.__main__ import main

    out = tmp_path / "plan.json"
    argv = ["--model", "configs/single_gpu.toml", "--gpus", "1", "--gpu", "h200",
            "--global-batch", "16", "--seq-len", "2048", "--fold", "mbs=16,dp_mode=replicate",
            "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "foldmesh's kernel rates measured on NVIDIA H200" in text
    assert "the largest term is grouped GEMMs bwd (medium)" in text
    (ours,) = json.loads(out.read_text())
    assert main([*argv, "--kernels", "megatron"]) == 0
    assert "calibrated on Megatron-Core's kernels" in capsys.readouterr().out
    (mega,) = json.loads(out.read_text())
    assert (ours["kernels"], mega["kernels"]) == ("foldmesh", "megatron")
    assert ours["step_time_s"] > mega["step_time_s"]
    assert main([*argv, "--set", "matmul_efficiency=0.5"]) == 2
    assert "--kernels megatron" in capsys.readouterr().err
