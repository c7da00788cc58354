"""Memory per rank, by term: weights, gradients, optimizer state, gathered weights,
activations, dispatch buffers and the pipeline's in-flight micro-batches.

Weights, gradients and optimizer state are counted exactly from the parameter shards the
rank holds (``_params.rank_params``): fp32 master weights, fp32 gradients of the same shard
(FSDP2's ``reduce_dtype``, or replication's fp32 all-reduce), and AdamW's two fp32 moments
plus its per-parameter ``step`` scalar. ``tests/plan/test_plan_comm.py`` checks these three
against the tensors of a real trainer step on 8 gloo ranks, byte for byte.

Under FSDP2 the rank also holds, while a group computes, the group's gathered weights in
the compute dtype (and their gradients before the reduce-scatter): with pp = 1 one block at
a time is gathered (plus the next one prefetched); with pp > 1 ``foldmesh.train`` keeps a
stage's weights gathered for the whole step (``reshard_after_forward=False``), so the whole
stage counts. Whenever gradient synchronisation is off for some micro-batches (pp > 1, or
pp = 1 with several micro-batches: the trainer syncs only on the last), FSDP2 accumulates
every group's *unsharded* gradients in fp32 until the step's reduce-scatter: the rank's
whole unsharded model, 4 bytes a parameter. Replication holds full fp32 copies already
counted as weights.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

from ._params import ParamShard, fsdp_index, rank_params
from ._workload import Layout, Workload

FP32 = 4
GIB = 2 ** 30


@dataclass(frozen=True)
class Memory:
    """Bytes one rank holds at its peak, by term (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    gathered: int = 0
    """FSDP2's gathered compute-dtype weights and their unreduced gradients."""
    activations: int = 0
    """Saved for backward, over every micro-batch in flight."""
    dispatch: int = 0
    """The MoE dispatch's rows and indices saved for backward, over the micro-batches in
    flight (kept apart from the other activations: they scale with k and the capacity)."""
    pipeline: int = 0
    """The pipeline's stage-boundary receive buffers (torch allocates one per micro-batch
    and direction for the whole step)."""
    detail: dict = field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.gathered
                + self.activations + self.dispatch + self.pipeline)

    def terms(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients,
                "optimizer": self.optimizer, "gathered": self.gathered,
                "activations": self.activations, "dispatch": self.dispatch,
                "pipeline": self.pipeline}


def local_numel(p: ParamShard, layout: Layout, rank: int) -> int:
    """Elements of ``p`` this rank stores: its FSDP2 chunk, or the whole shard."""
    f = layout.fold
    if layout.data_parallel == "replicate" or (p.expert and f.edp == 1):
        return p.numel
    ranks, index = fsdp_index(f, rank, p.expert)
    return p.fsdp_shard(ranks, index)[1]


def state_bytes(workload: Workload, layout: Layout, rank: int) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes of ``rank``: exact, see the module docstring."""
    return _state_bytes(workload.model, layout.replace(micro_batch=1,
                                                       activation_checkpoint="none"), rank)


@lru_cache(maxsize=8192)
def _state_bytes(cfg, layout: Layout, rank: int) -> tuple[int, int, int]:
    params = rank_params(cfg, layout, rank)
    numel = sum(local_numel(p, layout, rank) for p in params)
    return numel * FP32, numel * FP32, 2 * numel * FP32 + FP32 * len(params)


def gathered_bytes(workload: Workload, layout: Layout, rank: int) -> int:
    """FSDP2's gathered weights and unreduced gradients at the peak (compute dtype)."""
    if layout.data_parallel != "fsdp":
        return 0
    accumulate = layout.microbatches(workload) > 1
    return _gathered(workload.model, workload.act_bytes,
                     layout.replace(micro_batch=1, activation_checkpoint="none"), rank,
                     accumulate)


@lru_cache(maxsize=8192)
def _gathered(cfg, e: int, layout: Layout, rank: int, accumulate: bool) -> int:
    f = layout.fold
    groups: dict[str, int] = defaultdict(int)
    for p in rank_params(cfg, layout, rank):
        if p.expert and f.edp == 1:
            continue
        ranks, _ = fsdp_index(f, rank, p.expert)
        groups[p.group.split(".")[-1]] += p.fsdp_shard(ranks, 0)[0] * ranks
    sizes = sorted(groups.values(), reverse=True)
    if not sizes:
        return 0
    if f.pp > 1:
        # the stage stays gathered all step, and with gradient sync off until the schedule
        # ends FSDP2 accumulates the stage's unsharded gradients in its fp32 reduce_dtype
        return sum(sizes) * (e + FP32)
    if accumulate:
        # one layer computing and the next prefetched; with sync off for all but the last
        # micro-batch every group keeps its unsharded fp32 gradients until the step's end
        return sum(sizes[:2]) * e + sum(sizes) * FP32
    # one layer computing, the next prefetched; the gradients of the layer in backward
    return (sum(sizes[:2]) + sizes[0]) * e
