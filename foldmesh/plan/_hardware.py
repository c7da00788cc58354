"""GPU presets: peak rates, memory, links, and one calibration per preset.

Every constant is a vendor figure except the four calibration fractions, which are fitted
once per preset (never per model or configuration) and say how much of a peak rate real
kernels reach. Sources:

* H100 SXM5: 989.4 TFLOP/s dense BF16, 80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s total
  (450 GB/s per direction): NVIDIA H100 Tensor Core GPU datasheet. Network: one ConnectX-7
  NDR 400 Gb/s (50 GB/s) NIC per GPU, the DGX H100 layout (DGX H100 user guide) and the
  paper's cluster (989.5 TFLOP/s, 450 GB/s NVLink one way, 400 Gb/s InfiniBand).
* H200 SXM: the same compute and NVLink as H100; 141 GB HBM3e at 4.8 TB/s (H200 datasheet);
  DGX H200 also has one 400 Gb/s NIC per GPU.
* B200 (HGX B200): 2.25 PFLOP/s dense BF16 (NVIDIA's 4.5 PFLOP/s sparse figure halved),
  180 GB HBM3e at 8 TB/s, NVLink 5 1.8 TB/s total (900 GB/s per direction) (DGX B200
  datasheet: 1,440 GB over 8 GPUs); 400 Gb/s ConnectX-7 per GPU as in DGX B200.
* A100 SXM4 80GB: 312 TFLOP/s dense BF16, 80 GB HBM2e at 2.039 TB/s, NVLink 3 600 GB/s total
  (300 GB/s per direction) (A100 datasheet); one HDR 200 Gb/s (25 GB/s) NIC per GPU (DGX A100).

Latencies are per collective step (NCCL's ring/tree base latencies are a few microseconds
within a node and several across one: PyTorch's ``torch/_inductor/comm_analysis.py`` uses
6.6 µs base, 0.6 µs per NVLink step and 2.7 µs per network step).

Calibration (H100, fitted once to the paper's Table 3, docs/planner.md): large BF16 GEMMs
reach ``matmul_efficiency`` of peak, memory-bound kernels ``memory_efficiency`` of HBM
bandwidth, NCCL ``link_efficiency`` of a link's bandwidth; ``reserved_gib`` of HBM is not
available to tensors (CUDA context, NCCL buffers, allocator fragmentation). Other presets
reuse the H100 fractions: the same kernels on the same software stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import tomllib

from .._fold import FoldError

GB = 1e9
GIB = 2 ** 30


@dataclass(frozen=True)
class Hardware:
    """One GPU and its links (rates per GPU, per direction)."""

    name: str
    peak_flops: float
    """Dense BF16 FLOP/s."""
    hbm_bytes: float
    hbm_bandwidth: float
    """B/s."""
    nvlink_bandwidth: float
    """B/s per GPU per direction within a node."""
    network_bandwidth: float
    """B/s per GPU per direction across nodes (its NIC)."""
    nvlink_latency: float = 3e-6
    """Seconds per collective step within a node."""
    network_latency: float = 8e-6
    """Seconds per collective step across nodes."""
    gpus_per_node: int = 8
    matmul_efficiency: float = 0.84
    memory_efficiency: float = 0.7
    link_efficiency: float = 0.75
    reserved_gib: float = 6.0
    gemm_half_size: float = 256.0
    """A GEMM dimension of this size runs at half a large GEMM's rate (see _time.py)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "name" and (not isinstance(v, (int, float)) or v <= 0):
                raise FoldError(f"hardware {self.name}: {f.name} must be a positive number, "
                                f"got {v!r}")
        for f in ("matmul_efficiency", "memory_efficiency", "link_efficiency"):
            if getattr(self, f) > 1:
                raise FoldError(f"hardware {self.name}: {f} is a fraction of peak (<= 1)")

    @property
    def usable_bytes(self) -> float:
        return self.hbm_bytes - self.reserved_gib * GIB

    def replace(self, **changes) -> Hardware:
        bad = [k for k in changes if k not in {f.name for f in dataclasses.fields(self)}]
        if bad:
            raise FoldError(f"unknown hardware settings {bad}; settings are "
                            f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)


HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM", 989.5e12, 80 * GB, 3.35e12, 450 * GB, 50 * GB),
    "h200": Hardware("H200 SXM", 989.5e12, 141 * GB, 4.8e12, 450 * GB, 50 * GB),
    "b200": Hardware("B200", 2250e12, 180 * GB, 8.0e12, 900 * GB, 50 * GB),
    "a100": Hardware("A100 SXM 80GB", 312e12, 80 * GB, 2.039e12, 300 * GB, 25 * GB),
}


def hardware(name_or_path: str, **overrides) -> Hardware:
    """A preset by name, or a TOML file (``preset = "h100"`` plus any fields to override),
    with ``overrides`` applied."""
    path = Path(name_or_path)
    if name_or_path.lower() in HARDWARE:
        hw = HARDWARE[name_or_path.lower()]
    elif path.suffix == ".toml":
        if not path.is_file():
            raise FoldError(f"--gpu {name_or_path}: no such TOML file")
        table = tomllib.loads(path.read_text())
        base = str(table.pop("preset", "h100")).lower()
        if base not in HARDWARE:
            raise FoldError(f"{path}: preset = {base!r} is not a GPU preset; choose one of "
                            f"{sorted(HARDWARE)}")
        hw = HARDWARE[base].replace(name=table.pop("name", path.stem), **table)
    else:
        raise FoldError(f"--gpu {name_or_path!r} is not a GPU preset; choose one of "
                        f"{sorted(HARDWARE)} or give a .toml file")
    return hw.replace(**overrides) if overrides else hw
