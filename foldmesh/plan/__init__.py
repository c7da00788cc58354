"""foldmesh.plan: which fold to run, before renting the cluster.

    from foldmesh.plan import Workload, hardware, search, estimate
    work = Workload(preset("mixtral-8x22b"), global_batch=256, seq_len=4096)
    best = search(work, gpus=128, hw=hardware("h100"))[0]       # ranked Estimates
    print(best.layout, best.mfu, best.memory.terms())

Every number comes from foldmesh's own code paths: ``step_collectives`` lists the
collectives a training step issues (equal to ``foldmesh.testing.CollectiveCounter``'s
count), ``state_bytes`` the weights, gradients and AdamW state a rank holds (equal to its
tensors), ``activation_memory`` what autograd saves; the time model (``_time.py``) and the
hardware presets (``_hardware.py``) say how fast that runs: at foldmesh's own measured
kernel rates where a preset has them (``load_rates``, ``save_rates``; ``rates/*.json``), or
at fractions calibrated on the paper's Megatron-Core runs (``hardware(name,
kernels="megatron")``). ``python -m foldmesh.plan`` is the command line; docs/planner.md
compares it with the paper.
"""

from ._activations import ActivationMemory, activation_memory, inflight_microbatches
from ._comm import Collective, axis_label, bytes_by, counts_by, step_collectives
from ._dry_run import DryRunReport, dry_run
from ._estimate import Estimate, estimate
from ._from_config import from_train_config
from ._hardware import HARDWARE, Hardware, hardware
from ._memory import Memory, state_bytes
from ._params import ParamShard, rank_params
from ._rates import KernelRates, load_rates, save_rates, shape_class
from ._search import layouts, search, valid
from ._workload import Layout, Workload, rank_coordinates

__all__ = [
    "HARDWARE", "ActivationMemory", "Collective", "DryRunReport", "Estimate", "Hardware",
    "KernelRates", "Layout", "Memory", "ParamShard", "Workload", "activation_memory",
    "axis_label", "bytes_by", "counts_by", "dry_run", "estimate", "from_train_config",
    "hardware", "inflight_microbatches", "layouts", "load_rates", "rank_coordinates",
    "rank_params", "save_rates", "search", "shape_class", "state_bytes", "step_collectives",
    "valid",
]
