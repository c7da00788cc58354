"""Measured rates of foldmesh's own kernels on one GPU: one JSON record per GPU preset,
``foldmesh/plan/rates/<preset>.json``, read by the time model (``_time.py``).

A record (every rate per GPU, bf16 kernels)::

    {"gpu": "NVIDIA H200",             # torch.cuda.get_device_name
     "date": "2026-12-04",             # of the measurement, YYYY-MM-DD
     "source": "...",                  # what measured it (script, commit, versions)
     "dense_gemm_tflops": 761,         # one dense bf16 GEMM of 8192^3 (torch)
     "copy_gbps": 4251,                # device copy, read + write bytes per second
     "grouped_gemm_tflops": {          # foldmesh's grouped GEMM per shape class
         "fwd": {"small": .., "medium": .., "large": ..},
         "bwd": {"small": .., "medium": .., "large": ..}},   # input + weight gradients
     "permute_gbps": 2721,             # permute + unpermute, bytes moved per second
     "attention_tflops": 330,          # flash attention, causal FLOPs per second
     "elementwise_gbps": 3360,         # norms, RoPE, SwiGLU, residual adds, loss, AdamW
     "notes": "..."}                   # how each figure was derived; which are estimates

``shape_class`` sorts a grouped GEMM by its smallest dimension. ``save_rates`` is what
``scripts/bench_gpu.py`` calls with freshly measured rates; ``load_rates`` what the
hardware presets read.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .._fold import FoldError

RATES_DIR = Path(__file__).parent / "rates"
SHAPE_CLASSES = ("small", "medium", "large")
RATES_PER_S = {"dense_gemm_tflops": 1e12, "copy_gbps": 1e9, "permute_gbps": 1e9,
               "attention_tflops": 1e12, "elementwise_gbps": 1e9}
TEXT = ("gpu", "date", "source", "notes")
KEYS = ("gpu", "date", "source", "dense_gemm_tflops", "copy_gbps", "grouped_gemm_tflops",
        "permute_gbps", "attention_tflops", "elementwise_gbps", "notes")


def shape_class(rows_per_group: float, k: int, n: int) -> str:
    """"small", "medium" or "large": a grouped GEMM ``[rows, k] x [k, n]`` per group, by
    m = min(rows_per_group, k, n): small below 256, medium below 2048, large from 2048."""
    m = min(rows_per_group, k, n)
    return "small" if m < 256 else "medium" if m < 2048 else "large"


def check_rates(rates: dict, where: str = "rates") -> None:
    """Raise ``FoldError`` naming the field unless ``rates`` has the module docstring's
    schema: exactly its keys, texts as strings, every rate a positive finite number."""
    missing = [k for k in KEYS if k not in rates]
    extra = [k for k in rates if k not in KEYS]
    if missing or extra:
        raise FoldError(f"{where}: " + "; ".join(
            ([f"missing {missing}"] if missing else [])
            + ([f"unknown {extra} (put anything else in 'notes')"] if extra else []))
            + f"; a rates record has exactly the keys {list(KEYS)}")
    for k in TEXT:
        if not isinstance(rates[k], str):
            raise FoldError(f"{where}: {k} must be a string, got {rates[k]!r}")
    try:
        datetime.date.fromisoformat(rates["date"])
    except ValueError:
        raise FoldError(f"{where}: date {rates['date']!r} is not YYYY-MM-DD") from None
    numbers = {k: rates[k] for k in RATES_PER_S}
    grouped = rates["grouped_gemm_tflops"]
    if not isinstance(grouped, dict) or set(grouped) != {"fwd", "bwd"} or any(
            not isinstance(grouped[p], dict) or set(grouped[p]) != set(SHAPE_CLASSES)
            for p in ("fwd", "bwd")):
        raise FoldError(f"{where}: grouped_gemm_tflops must be {{'fwd': {{...}}, 'bwd': "
                        f"{{...}}}}, each with the shape classes {list(SHAPE_CLASSES)}; got "
                        f"{grouped!r}")
    for p in ("fwd", "bwd"):
        numbers |= {f"grouped_gemm_tflops.{p}.{c}": grouped[p][c] for c in SHAPE_CLASSES}
    for k, v in numbers.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v <= 0:
            raise FoldError(f"{where}: {k} must be a positive number, got {v!r}")


def load_rates(gpu_preset: str) -> dict | None:
    """The rates record of a GPU preset (``"h200"``), or None when none was measured."""
    path = RATES_DIR / f"{gpu_preset.lower()}.json"
    if not path.is_file():
        return None
    rates = json.loads(path.read_text())
    check_rates(rates, str(path))
    return rates


def preset_of(gpu: str) -> str | None:
    """The hardware preset whose name a device name contains ("NVIDIA H200" -> "h200")."""
    from ._hardware import HARDWARE

    return next((k for k in HARDWARE if k.upper() in gpu.upper()), None)


def save_rates(rates: dict, source: str, path: str | Path | None = None) -> Path:
    """Write ``rates`` with ``source`` (what measured them) to ``path`` (default: the
    preset's file, ``rates/<preset>.json``, the preset found in ``rates["gpu"]``) and
    return the path. ``date`` defaults to today and ``notes`` to ""; the record is checked
    first and written atomically (a temporary file renamed over the old one), so a reader
    sees the old record or the new one, never a torn one."""
    record = {"date": datetime.date.today().isoformat(), "notes": ""} | dict(rates)
    record["source"] = source
    check_rates(record, "save_rates")
    if path is None:
        preset = preset_of(record["gpu"])
        if preset is None:
            raise FoldError(f"save_rates: gpu {record['gpu']!r} names no hardware preset; "
                            "pass path= to write the record elsewhere")
        path = RATES_DIR / f"{preset}.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({k: record[k] for k in KEYS}, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's file is private; the record is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class KernelRates:
    """A rates record in the time model's units (FLOP/s, B/s); hashable, as ``Hardware``
    is a cache key."""

    gpu: str
    date: str
    dense_gemm: float
    """FLOP/s of the 8192^3 dense GEMM the record measured (the shape curve's anchor)."""
    copy: float
    grouped_fwd: tuple[float, float, float]
    """FLOP/s per shape class, in ``SHAPE_CLASSES`` order."""
    grouped_bwd: tuple[float, float, float]
    permute: float
    attention: float
    elementwise: float

    @classmethod
    def from_record(cls, rates: dict) -> KernelRates:
        g = rates["grouped_gemm_tflops"]
        per_s = {k: rates[k] * s for k, s in RATES_PER_S.items()}
        return cls(gpu=rates["gpu"], date=rates["date"], dense_gemm=per_s["dense_gemm_tflops"],
                   copy=per_s["copy_gbps"],
                   grouped_fwd=tuple(g["fwd"][c] * 1e12 for c in SHAPE_CLASSES),
                   grouped_bwd=tuple(g["bwd"][c] * 1e12 for c in SHAPE_CLASSES),
                   permute=per_s["permute_gbps"], attention=per_s["attention_tflops"],
                   elementwise=per_s["elementwise_gbps"])

    def grouped(self, shape: str, backward: bool = False) -> float:
        """FLOP/s of a grouped GEMM of shape class ``shape``, forward or backward."""
        return (self.grouped_bwd if backward else self.grouped_fwd)[SHAPE_CLASSES.index(shape)]
