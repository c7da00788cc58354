"""foldmesh.plan: choose a fold for a model and a cluster (work in progress)."""

from ._comm import Collective, axis_label, bytes_by, counts_by, step_collectives
from ._from_config import from_train_config
from ._memory import Memory, state_bytes
from ._params import ParamShard, rank_params
from ._workload import Layout, Workload, rank_coordinates

__all__ = ["Collective", "Layout", "Memory", "ParamShard", "Workload", "axis_label",
           "bytes_by", "counts_by", "from_train_config", "rank_coordinates", "rank_params",
           "state_bytes", "step_collectives"]
