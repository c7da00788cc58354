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

Kernel rates: the two compute fractions describe Megatron-Core's kernels, which reached the
paper's MFU. foldmesh's own kernels are measured instead, per GPU, in
``foldmesh/plan/rates/<preset>.json`` (``_rates.py``); a preset with such a record carries it
as ``rates`` and its compute follows them (``kernels="foldmesh"``, the default), and
``hardware(name, kernels="megatron")`` drops it for the calibrated fractions. Presets
without a record (today: all but H200) use the fractions either way. The communication
constants are the same for both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import tomllib

from .._fold import FoldError
from ._rates import KernelRates, load_rates

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
    rates: KernelRates | None = None
    """foldmesh's measured kernel rates on this GPU; None: the calibrated fractions."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name not in ("name", "rates") and (not isinstance(v, (int, float))
                                                    or v <= 0):
                raise FoldError(f"hardware {self.name}: {f.name} must be a positive number, "
                                f"got {v!r}")
        for f in ("matmul_efficiency", "memory_efficiency", "link_efficiency"):
            if getattr(self, f) > 1:
                raise FoldError(f"hardware {self.name}: {f} is a fraction of peak (<= 1)")

    @property
    def kernels(self) -> str:
        """"foldmesh" (measured rates) or "megatron" (the calibrated fractions)."""
        return "foldmesh" if self.rates is not None else "megatron"

    def describe_kernels(self) -> str:
        """One line: where this preset's compute rates come from."""
        if self.rates is not None:
            return (f"compute at foldmesh's kernel rates measured on {self.rates.gpu} "
                    f"({self.rates.date}; bf16)")
        measured = ", ".join(sorted(k for k, v in HARDWARE.items() if v.rates)) or "none"
        return ("compute at fractions of peak calibrated on Megatron-Core's kernels (the "
                f"paper's Table 3); foldmesh's own rates are measured for: {measured}")

    @property
    def usable_bytes(self) -> float:
        return self.hbm_bytes - self.reserved_gib * GIB

    def replace(self, **changes) -> Hardware:
        bad = [k for k in changes if k not in {f.name for f in dataclasses.fields(self)}]
        if bad:
            raise FoldError(f"unknown hardware settings {bad}; settings are "
                            f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)


def _measured(preset: str) -> KernelRates | None:
    rates = load_rates(preset)
    return KernelRates.from_record(rates) if rates is not None else None


HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM", 989.5e12, 80 * GB, 3.35e12, 450 * GB, 50 * GB),
    "h200": Hardware("H200 SXM", 989.5e12, 141 * GB, 4.8e12, 450 * GB, 50 * GB),
    "b200": Hardware("B200", 2250e12, 180 * GB, 8.0e12, 900 * GB, 50 * GB),
    "a100": Hardware("A100 SXM 80GB", 312e12, 80 * GB, 2.039e12, 300 * GB, 25 * GB),
}
HARDWARE = {k: hw.replace(rates=_measured(k)) for k, hw in HARDWARE.items()}
KERNELS = ("foldmesh", "megatron")
# fractions the measured rates replace: setting one would change nothing
_UNUSED_WITH_RATES = ("matmul_efficiency", "memory_efficiency")


def hardware(name_or_path: str, kernels: str | None = None, **overrides) -> Hardware:
    """A preset by name, or a TOML file (``preset = "h100"`` plus any fields to override,
    and optionally ``kernels``), with ``overrides`` applied. ``kernels``: "foldmesh" (the
    default) keeps the preset's measured kernel rates where it has them, "megatron" uses
    the fractions calibrated on the paper's Table 3 (see the module docstring)."""
    path = Path(name_or_path)
    table: dict = {}
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
        hw = HARDWARE[base]
        kernels = kernels or table.pop("kernels", None)
        table.setdefault("name", path.stem)
    else:
        raise FoldError(f"--gpu {name_or_path!r} is not a GPU preset; choose one of "
                        f"{sorted(HARDWARE)} or give a .toml file")
    table.pop("kernels", None)
    kernels = kernels or "foldmesh"
    if kernels not in KERNELS:
        raise FoldError(f"--kernels {kernels!r}: choose foldmesh (foldmesh's measured kernel "
                        "rates, where the preset has them) or megatron (the fractions "
                        "calibrated on the paper's Table 3)")
    if kernels == "megatron":
        hw = hw.replace(rates=None)
    unused = [k for k in (*table, *overrides) if k in _UNUSED_WITH_RATES]
    if hw.rates is not None and unused:
        raise FoldError(f"{unused[0]} has no effect on {hw.name}: its compute follows "
                        f"foldmesh's measured kernel rates (foldmesh/plan/rates/); use "
                        f"--kernels megatron (or kernels = \"megatron\" in the TOML file) "
                        "to time it with the calibrated fractions")
    changes = table | overrides
    return hw.replace(**changes) if changes else hw
