"""What the planner is asked about: a workload (model, batch, precision) and one layout of it.

A :class:`Workload` is fixed by the user: the model, the global batch and sequence length,
the compute precision, and the MoE settings that change communication (capacity, static
routing). A :class:`Layout` is one candidate the planner ranks: the fold, the micro-batch
size, the pipeline schedule and its stages per rank, activation checkpointing and the
data-parallel mode. Both are plain frozen dataclasses so that an estimate is a pure function
of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

from .._fold import Fold, FoldError
from ..models import ModelConfig

DATA_PARALLEL = ("fsdp", "replicate")
AC_MODES = ("none", "full")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Workload:
    """The fold-independent part of a training run.

    Attributes:
        model: the model's configuration (``capacity_factor`` set = token dropping).
        global_batch: sequences per optimizer step.
        seq_len: tokens per sequence.
        compute_dtype: "bf16" or "fp32": activations, what crosses TP/CP/EP/PP links, and
            FSDP2's gathered weights (its ``param_dtype``). Master weights, gradients and
            AdamW state are fp32 (FSDP2's ``reduce_dtype``), as the trainer runs them.
        pad_to_capacity: pad every expert to its capacity (static shapes; needs a
            ``capacity_factor``). Otherwise routing is assumed perfectly balanced.
        dispatcher: the MoE token dispatcher, "alltoall" (Figure 2) or "allgather".
        expert_imbalance: the busiest expert's tokens over the mean (max/mean, >= 1), as the
            trainer's expert-load metrics report it for a learned router; 1.0 is the
            balanced routing of ``moe.force_balance`` (how Megatron-Core's figures are
            measured). The busiest expert's rank computes and receives that much more,
            and every rank waits for it: the time model scales the routed experts' GEMMs
            and the dispatch all-to-alls by it (up to the capacity, when one is set). The
            collectives' bytes stay the balanced ones.
    """

    model: ModelConfig
    global_batch: int
    seq_len: int
    compute_dtype: str = "bf16"
    pad_to_capacity: bool = False
    dispatcher: str = "alltoall"
    expert_imbalance: float = 1.0

    def __post_init__(self) -> None:
        if not self.expert_imbalance >= 1.0:
            raise FoldError(f"Workload.expert_imbalance must be >= 1 (max over mean expert "
                            f"load; 1 = balanced), got {self.expert_imbalance!r}")
        for name in ("global_batch", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise FoldError(f"Workload.{name} must be a positive int, got {v!r}")
        if self.compute_dtype not in DTYPE_BYTES:
            raise FoldError(f"compute_dtype must be one of {sorted(DTYPE_BYTES)}, "
                            f"got {self.compute_dtype!r}")
        if self.pad_to_capacity and self.model.capacity_factor is None:
            raise FoldError("pad_to_capacity needs a capacity: set the model's "
                            "capacity_factor (e.g. 1.0)")
        if self.dispatcher not in ("alltoall", "allgather"):
            raise FoldError(f"dispatcher must be 'alltoall' or 'allgather', "
                            f"got {self.dispatcher!r}")

    @property
    def load_factor(self) -> float:
        """How much more the busiest expert's rank computes and receives than the mean:
        ``expert_imbalance``, capped where a capacity drops the excess."""
        cap = self.model.capacity_factor
        if self.pad_to_capacity:
            return 1.0  # every expert holds exactly its capacity
        return min(self.expert_imbalance, max(cap, 1.0)) if cap is not None \
            else self.expert_imbalance

    @property
    def act_bytes(self) -> int:
        """Bytes of one activation element."""
        return DTYPE_BYTES[self.compute_dtype]


@dataclass(frozen=True)
class Layout:
    """One candidate mapping of a workload onto the ranks.

    Attributes:
        fold: the resolved fold (dp and edp known).
        micro_batch: sequences per micro-batch per data-parallel replica.
        schedule: the pipeline schedule (``foldmesh.pipeline.SCHEDULES``); ignored at pp = 1.
        stages_per_rank: virtual pipeline stages per pp rank (1 unless interleaved/V).
        activation_checkpoint: "none" or "full" (recompute every block in backward).
        data_parallel: "fsdp" (FSDP2: dense weights over dp·cp, experts over edp) or
            "replicate" (full copies, one gradient all-reduce per group).
        pp_layers: layers of each pipeline stage, in stage order (the trainer's
            ``fold.pp_layers``); empty: the balanced default split (``split_layers``).
    """

    fold: Fold
    micro_batch: int = 1
    schedule: str = "1F1B"
    stages_per_rank: int = 1
    activation_checkpoint: str = "none"
    data_parallel: str = "fsdp"
    pp_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.fold.resolved:
            raise FoldError(f"Layout needs a resolved fold (dp and edp known), got {self.fold}")
        if not isinstance(self.micro_batch, int) or self.micro_batch <= 0:
            raise FoldError(f"micro_batch must be a positive int, got {self.micro_batch!r}")
        if self.stages_per_rank < 1:
            raise FoldError(f"stages_per_rank must be >= 1, got {self.stages_per_rank}")
        if self.activation_checkpoint not in AC_MODES:
            raise FoldError(f"activation_checkpoint must be one of {AC_MODES}, "
                            f"got {self.activation_checkpoint!r}")
        if not isinstance(self.pp_layers, tuple) or not all(
                isinstance(n, int) and n >= 1 for n in self.pp_layers):
            raise FoldError(f"pp_layers must be a tuple of layer counts >= 1, "
                            f"got {self.pp_layers!r}")
        if self.pp_layers and self.fold.pp == 1:
            raise FoldError(f"pp_layers = {list(self.pp_layers)} splits a pipeline, but pp = 1")
        if self.data_parallel not in DATA_PARALLEL:
            raise FoldError(f"data_parallel must be one of {DATA_PARALLEL}, "
                            f"got {self.data_parallel!r}")

    @property
    def num_stages(self) -> int:
        return self.fold.pp * self.stages_per_rank

    def microbatches(self, workload: Workload) -> int:
        """Micro-batches per optimizer step, global_batch / (dp · micro_batch)."""
        per_replica = self.fold.dp * self.micro_batch
        if workload.global_batch % per_replica:
            raise FoldError(
                f"global batch {workload.global_batch} is not divisible by dp x micro_batch "
                f"= {self.fold.dp} x {self.micro_batch} = {per_replica}; choose a micro-batch "
                f"size or dp that divides it"
            )
        return workload.global_batch // per_replica

    def replace(self, **changes) -> Layout:
        return dataclasses.replace(self, **changes)


@lru_cache(maxsize=65536)
def _coordinates(fold: Fold, rank: int) -> tuple[tuple[str, int], ...]:
    s = fold.stage_size
    pp, r = divmod(rank, s)
    out = [("pp", pp)]
    for axes in (("tp", "cp", "dp"), ("etp", "ep", "edp")):
        rest = r
        for a in axes:
            rest, c = divmod(rest, fold.size(a))
            out.append((a, c))
    return tuple(out)


def rank_coordinates(fold: Fold, rank: int) -> dict[str, int]:
    """The coordinate of global ``rank`` on every axis of both views (tp fastest, then cp,
    dp; etp fastest, then ep, edp; pp outermost), as ``FoldedMesh.coordinate`` gives it."""
    if not 0 <= rank < fold.world_size:
        raise FoldError(f"rank {rank} is outside the fold's {fold.world_size} ranks")
    return dict(_coordinates(fold, rank))
