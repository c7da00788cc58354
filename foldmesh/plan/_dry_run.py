"""Dry run: one rank of a large training world, simulated on this CPU with the real code.

Dimension legend: W ranks, b sequences per micro-batch of one data-parallel replica, S
sequence length, H hidden, V vocabulary, E experts, k top-k, C per-expert capacity.

``dry_run(workload, layout, rank)`` joins a world of ``W = layout.fold.world_size`` ranks as
``rank`` on torch's fake process-group backend (every collective returns at once and moves
nothing; DeviceMesh asks for every group of every axis, but a rank creates only those it
belongs to, so a world of 1,024 costs a tenth of a second) and builds the real
``FoldedMesh``. It builds the model on the meta device (no weight memory: Mixtral-8x22B's
141B parameters cost nothing), splits it into this rank's pipeline stages, parallelizes
them with ``foldmesh.parallelize`` and ``foldmesh.apply_fsdp`` exactly as
``foldmesh.train.build.build_model`` does, and runs one micro-batch forward and backward
through each stage (a fresh meta tensor as the stage input: no schedule, no P2P). Then
the data-parallel step: with pp > 1 and FSDP the backward runs without gradient sync and
the stages reduce afterwards, as a pipeline schedule does
(``PipelineStage.perform_reduce_grad``: outside autograd, so those collectives are
"forward"); ``reduce_gradients`` with replication; ``clip_grad_norm_`` always. A
``CollectiveCounter`` records every collective of the step, saved-tensor hooks measure
what the forward keeps for backward and ``MemTracker`` the peak of live memory.

Routing is static: with the all-to-all dispatcher every expert is padded to its capacity
(``pad_to_capacity``; a dropless model gets ``capacity_factor = 1.0``, the balanced share),
so split sizes are known on the host without data. The all-gather dispatcher runs dropless:
its collectives and shapes do not depend on the capacity, and dropping without padding
would need a host synchronisation.

What runs differently from a GPU step, and why (all inside this module, undone after):

* FSDP2 refuses meta parameters and allocates its all-gather buffers on the mesh's device:
  during the dry run its device is the meta device and the check is skipped.
* The MoE kernels' torch reference path (the CPU default) reads group sizes on the host and
  computes SwiGLU in fp32: on meta tensors the grouped GEMM, SwiGLU and unpermute run as
  stand-ins with the shapes and the saved tensors of the Triton kernels a GPU runs.
* Attention on meta tensors would take the math path (an [S, S] score matrix per head kept
  for backward): it runs as flash attention's meta kernel, which keeps q, k, v, the output
  and the log-sum-exp, as on a GPU.
* CUDA autocast (how the trainer runs bf16 with replication) does not act on meta tensors:
  a function mode casts the fp32 inputs of matrix products and attention as it would,
  pauses where the router turns autocast off, and gives the MoE layer its token dtype
  (``foldmesh.moe.layer.token_dtype``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_PREFIX,
    CheckpointWrapper,
)
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.pipelining.stage import _PipelineStageBase
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from .._fold import ATTN_AXES, MOE_AXES, Fold, FoldError
from .._mesh import FLATTENED
from .._sequence import _cp_chunks, replica_tokens
from ..data_parallel import apply_fsdp, clip_grad_norm_, reduce_gradients
from ..kernels import capacity_for
from ..loss import cross_entropy, local_cross_entropy
from ..models import ModelConfig, Transformer
from ..moe import layer as layer_module
from ..moe import router as router_module
from ..parallelize import parallelize
from ..pipeline import check_pipeline, split_model
from ._meta import _meta_fsdp, _meta_kernels, _MetaMode, _patched
from ._workload import Layout, Workload, rank_coordinates

__all__ = ["DryRunReport", "LocalParam", "SavedGroup", "dry_run"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class LocalParam(NamedTuple):
    """One parameter as this rank holds it (``to_local()`` of its FSDP or tensor-parallel
    DTensor): global name, local shape, dtype, bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int


class SavedGroup(NamedTuple):
    """Saved activations of one kind: the op that made them (its autograd node, "leaf" for
    a tensor made outside autograd), local shape, dtype, bytes of one storage (a saved view
    counts its whole storage), how many (over all stages)."""

    op: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    count: int


@dataclass(frozen=True)
class DryRunReport:
    """What one rank holds and sends during one micro-batch's forward, backward and
    data-parallel step.

    Attributes:
        world_size: W.
        rank: the simulated global rank.
        workload: the workload as run: static routing set (see ``notes``); predict with it.
        layout: the layout as given.
        fold: the resolved fold.
        coordinates: the rank's index on every axis of both views (``rank_coordinates``).
        stages: the pipeline stages this rank holds (``(0,)`` without pp).
        params: every parameter shard this rank holds, over all its stages, fp32.
        param_bytes: their sum (FSDP shards, or full replicas with replication).
        grad_bytes: bytes of the gradients after the data-parallel step (FSDP: sharded).
        saved_activation_bytes: bytes the forward kept for backward, summed over this rank's
            stages, one micro-batch each: unique storages seen by the saved-tensor hooks,
            except the parameters' own (FSDP's gathered weights included). Copies made from
            weights in forward (autocast's casts, the experts' concatenated gate/up weight)
            count. With activation checkpointing: each block's inputs, not its internals.
        saved_by_stage: the same per stage, in ``stages`` order.
        saved_breakdown: the saved activations grouped by op, shape and dtype, largest
            first.
        peak_bytes: the peak of live meta memory over the whole step (``MemTracker``):
            parameters, gradients, gathered weights, activations and backward temporaries.
            One micro-batch per stage, the stages one after the other: a pipeline schedule
            keeps several micro-batches in flight, which this does not add.
        peak_by_kind: that peak by the tracker's kinds ("parameter", "gradient",
            "activation", "temp", ..., "total"). Its split between kinds is the tracker's
            (FSDP's gathered weights count as activations or temporaries).
        collectives: bytes per ``(kind, axis, direction)`` (``CollectiveCounter.bytes_by``).
        counts: collectives per ``(kind, axis, direction)``.
        table: ``CollectiveCounter.table()``.
        capacity: C, rows per expert and rank (None: the dispatcher runs dropless).
        notes: what the dry run set that the workload did not say.
        phase_seconds: wall time of "mesh", "model", "forward", "backward" and "dp_step".
        seconds: wall time of the whole dry run.
    """

    world_size: int
    rank: int
    workload: Workload
    layout: Layout
    fold: Fold
    coordinates: dict[str, int]
    stages: tuple[int, ...]
    params: tuple[LocalParam, ...]
    param_bytes: int
    grad_bytes: int
    saved_activation_bytes: int
    saved_by_stage: tuple[int, ...]
    saved_breakdown: tuple[SavedGroup, ...]
    peak_bytes: int | None
    peak_by_kind: dict[str, int]
    collectives: dict[tuple[str, str, str], int]
    counts: dict[tuple[str, str, str], int]
    table: str
    capacity: int | None
    notes: tuple[str, ...]
    phase_seconds: dict[str, float]
    seconds: float

    def to_dict(self) -> dict:
        """Plain JSON types; collective keys joined as ``"kind/axis/direction"``."""
        def joined(d: dict) -> dict:
            return {"/".join(k): v for k, v in sorted(d.items())}

        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(
            workload=dataclasses.asdict(self.workload), layout=dataclasses.asdict(self.layout),
            fold=dataclasses.asdict(self.fold), stages=list(self.stages),
            saved_by_stage=list(self.saved_by_stage), notes=list(self.notes),
            params=[{**p._asdict(), "shape": list(p.shape)} for p in self.params],
            saved_breakdown=[{**g._asdict(), "shape": list(g.shape)}
                             for g in self.saved_breakdown],
            collectives=joined(self.collectives), counts=joined(self.counts),
            coordinates=dict(self.coordinates), phase_seconds=dict(self.phase_seconds),
            peak_by_kind=dict(self.peak_by_kind))
        return out


def dry_run(workload: Workload, layout: Layout, rank: int, *, isolate: bool | None = None,
            timeout: float = 900.0) -> DryRunReport:
    """Simulate global ``rank`` of ``layout`` on this machine (see the module docstring).

    Args:
        workload: the model, batch, sequence length, precision and dispatcher.
        layout: the resolved fold, micro-batch size, schedule, stages per rank, activation
            checkpointing and data-parallel mode.
        rank: the global rank to simulate, in ``[0, layout.fold.world_size)``.
        isolate: run in a spawned subprocess with its own process-group state. None: only
            when this process already has a default process group (the dry run needs one
            of its own).
        timeout: seconds a subprocess may run before it is killed (``TimeoutError``).

    Raises:
        FoldError: a rank outside the world, a global batch or sequence the fold cannot
            split, a schedule the stages or micro-batches do not fit, or a model the fold
            cannot split (heads, vocabulary, experts, FFN sizes, layers), naming the setting.
    """
    rank_coordinates(layout.fold, rank)  # FoldError for a rank outside the world
    _check_request(workload, layout)
    if isolate is None:
        isolate = dist.is_initialized()
    if isolate:
        return _spawned(workload, layout, rank, timeout)
    if dist.is_initialized():
        raise RuntimeError("dry_run needs a default process group of its own and this "
                           "process already has one; call it with isolate=True")
    return _dry_run_here(workload, layout, rank)


def _check_request(workload: Workload, layout: Layout) -> None:
    """What a real run would refuse before any process group exists (the model's own sizes
    are checked by ``parallelize`` and ``split_model`` themselves)."""
    f = layout.fold
    layout.microbatches(workload)  # the global batch splits over dp and the micro-batch
    if f.pp > 1:  # one micro-batch runs: the schedule's micro-batch count does not matter
        check_pipeline(layout.schedule, f.pp, layout.stages_per_rank, None)
    split = 2 * f.cp if f.cp > 1 else 1
    s = workload.seq_len
    if s % split or (s // f.cp) % f.tp:
        need = split * f.tp if f.cp > 1 else f.tp
        raise FoldError(f"seq_len = {s} does not split into {split} chunk(s) over cp = {f.cp}, "
                        f"each divisible over tp = {f.tp}; use a multiple of {need}")


# ----------------------------------------------------------------------------- the run
def _dry_run_here(workload: Workload, layout: Layout, rank: int) -> DryRunReport:
    start = time.perf_counter()
    fold, phases = layout.fold, {}
    cfg, notes = _static_model(workload)
    dist.init_process_group("fake", rank=rank, world_size=fold.world_size)
    fm = None
    try:
        with _meta_kernels(), _meta_fsdp():
            t = time.perf_counter()
            fm = fold.build("cpu")
            phases["mesh"] = time.perf_counter() - t
            _check_mesh(fm, rank)
            t = time.perf_counter()
            parts = _build(cfg, fm, workload, layout)
            phases["model"] = time.perf_counter() - t
            counter, saved, peak = _step(parts, fm, workload, layout, phases)
            params = tuple(_shards(parts))
            grads = [_local(p.grad) for part in parts for p in part.parameters()
                     if p.grad is not None]
    finally:
        if fm is not None:
            fm.destroy()
        dist.destroy_process_group()
    tokens = layout.micro_batch * workload.seq_len // (fold.cp * fold.tp)
    capacity = None
    if cfg.capacity_factor is not None:
        capacity = capacity_for(tokens, cfg.num_experts, cfg.topk, cfg.capacity_factor)
    return DryRunReport(
        world_size=fold.world_size, rank=rank, fold=fold, layout=layout,
        workload=dataclasses.replace(workload, model=cfg,
                                     pad_to_capacity=workload.dispatcher == "alltoall"),
        coordinates=rank_coordinates(fold, rank),
        stages=tuple(getattr(p, "pipeline_stage", 0) for p in parts),
        params=params, param_bytes=sum(p.bytes for p in params),
        grad_bytes=sum(g.numel() * g.element_size() for g in grads),
        saved_activation_bytes=sum(s.activation_bytes() for s in saved),
        saved_by_stage=tuple(s.activation_bytes() for s in saved),
        saved_breakdown=_breakdown(saved),
        peak_bytes=peak.get("total"), peak_by_kind=peak,
        collectives=counter.bytes_by(), counts=counter.counts_by(), table=counter.table(),
        capacity=capacity, notes=tuple(notes), phase_seconds=phases,
        seconds=time.perf_counter() - start,
    )


def _check_mesh(fm, rank: int) -> None:
    """Every group is fake (no communicator, no sockets) and the mesh puts ``rank`` where
    the planner's ``rank_coordinates`` does."""
    groups = [*fm.attn.get_all_groups(), *fm.moe.get_all_groups(), fm.world.get_group()]
    groups += [fm[name].get_group() for name in FLATTENED]
    real = sorted({dist.get_backend(g) for g in groups} - {"fake"})
    if real:
        raise RuntimeError(f"the dry run's mesh created {real} process groups; every group "
                           "must use the fake backend")
    mesh = {axis: fm.coordinate(axis) for axis in (*ATTN_AXES, *MOE_AXES)}
    if mesh != rank_coordinates(fm.fold, rank):
        raise RuntimeError(f"rank {rank}: the mesh's coordinates {mesh} differ from "
                           f"rank_coordinates {rank_coordinates(fm.fold, rank)}")


def _static_model(workload: Workload) -> tuple[ModelConfig, list[str]]:
    """The model config with static routing for the chosen dispatcher."""
    m, notes = workload.model, []
    if workload.dispatcher == "allgather":
        if m.capacity_factor is not None:
            notes.append("allgather dispatcher run dropless: its collectives and shapes do "
                         "not depend on the capacity")
        changes = {"capacity_factor": None}
        if _has_field(m, "pad_to_capacity"):
            changes["pad_to_capacity"] = False
        return dataclasses.replace(m, **changes), notes
    changes = {}
    if m.capacity_factor is None:
        changes["capacity_factor"] = 1.0
        notes.append("dropless model run with capacity_factor = 1.0 (the balanced share)")
    if not workload.pad_to_capacity:
        notes.append("experts padded to their capacity (static split sizes)")
    if _has_field(m, "pad_to_capacity"):
        changes["pad_to_capacity"] = True
    return dataclasses.replace(m, **changes), notes


def _has_field(obj, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(obj)}


def _build(cfg: ModelConfig, fm, workload: Workload, layout: Layout) -> list[Transformer]:
    """This rank's stages, as ``foldmesh.train.build.build_model`` builds them, on meta."""
    f = fm.fold
    with torch.device("meta"):
        model = Transformer(cfg)
    parts = [model]
    if f.pp > 1:
        parts = split_model(model, fm, schedule=layout.schedule,
                            stages_per_rank=layout.stages_per_rank,
                            layers_per_stage=layout.pp_layers or None)
    for part in parts:
        if workload.dispatcher == "alltoall":  # static split sizes, whatever the config has
            for block in part.layers.values():
                if block.is_moe and not block.ffn.config.pad_to_capacity:
                    block.ffn.config = dataclasses.replace(block.ffn.config,
                                                           pad_to_capacity=True)
        parallelize(part, fm, dispatcher=workload.dispatcher,
                    activation_checkpoint=layout.activation_checkpoint)
        part.train()
    if layout.data_parallel == "fsdp":
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[workload.compute_dtype],
                                  reduce_dtype=torch.float32)
        for part in parts:
            # as the trainer: with pp the stage's weights stay gathered between micro-batches
            apply_fsdp(part, fm, mp_policy=mp, reshard_after_forward=f.pp == 1)
    return parts


def _step(parts, fm, workload: Workload, layout: Layout, phases: dict):
    """One micro-batch forward and backward through every stage, then the data-parallel
    step, all under one collective counter; returns it and each stage's saved tensors."""
    # imported here, where a dry run needs them: the planner alone imports neither
    from torch.distributed._tools.mem_tracker import MemTracker

    from ..testing import CollectiveCounter

    f = fm.fold
    dtype = DTYPES[workload.compute_dtype]
    fsdp = layout.data_parallel == "fsdp"
    # the residual stream between stages: the compute dtype under FSDP mixed precision,
    # fp32 under autocast with replication (what the trainer hands apply_pipeline)
    stream = dtype if fsdp else torch.float32
    b, s = layout.micro_batch, workload.seq_len
    last = f.pp * len(parts) - 1 if f.pp > 1 else 0
    # FSDP under a pipeline schedule reduces gradients after the step's backwards, outside
    # autograd (so the counter records those collectives as "forward")
    pipelined = fsdp and f.pp > 1
    counter, saved = CollectiveCounter(fm), []
    mode = _MetaMode(None if fsdp or dtype == torch.float32 else dtype)
    for part in parts:
        _recompute_under(part, mode)
    tracker = MemTracker()
    tracker.track_external(*parts)
    phases["forward"] = phases["backward"] = 0.0
    # the router turns autocast off around its matmul (its precision is its own setting);
    # on meta that is a no-op, so here it pauses the mode's casts instead
    no_autocast = (router_module, "_no_autocast", lambda device_type: mode.paused())
    token_dtype = (layer_module, "token_dtype", lambda x: mode.autocast or x.dtype)
    with tracker, counter, mode, _patched(no_autocast, token_dtype):
        for part in parts:
            stage = getattr(part, "pipeline_stage", 0)
            labels = torch.empty(b, s, dtype=torch.int64, device="meta")
            if stage == 0:  # this replica's token ids
                x = torch.empty(b, s, dtype=torch.int64, device="meta")
                if f.pp == 1:  # the whole model takes them as a DTensor, as the trainer
                    x, labels = replica_tokens(x, fm), replica_tokens(labels, fm)
            else:  # this rank's block of the residual stream, as a receive buffer
                x = torch.empty(b, s // (f.cp * f.tp), part.config.hidden_size, dtype=stream,
                                device="meta", requires_grad=True)
            t = time.perf_counter()
            keep = _SavedTensors()
            with keep.recording(part):
                out = part(x)
                if stage == last and f.pp == 1:
                    out = cross_entropy(out, labels, fm, reduction="sum")
                elif stage == last:  # the pipeline's loss of a micro-batch
                    out = local_cross_entropy(out.to(stream), _cp_chunks(labels, fm), fm, "sum")
                else:
                    out = out.to(stream)
            saved.append(keep)
            phases["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            if pipelined:  # as PipelineStage.backward_maybe_with_nosync: reduce later
                part.set_is_last_backward(False)
                part.set_reshard_after_backward(False)
                part.set_requires_gradient_sync(False)
            out.backward(None if stage == last else torch.empty_like(out))
            keep.release()
            del out
            phases["backward"] += time.perf_counter() - t
        t = time.perf_counter()
        if pipelined:  # the schedule's REDUCE_GRAD action, after its last backward
            for part in parts:
                _PipelineStageBase.perform_reduce_grad(SimpleNamespace(submod=part), 1)
        if not fsdp:
            reduce_gradients(parts, fm)
        clip_grad_norm_(parts, fm, 1.0)
        phases["dp_step"] = time.perf_counter() - t
    peak = tracker.get_tracker_snapshot("peak").get(torch.device("meta"), {})
    return counter, saved, {str(getattr(k, "value", k)).lower(): v for k, v in peak.items()}


def _recompute_under(part: nn.Module, mode: TorchFunctionMode) -> None:
    """Make activation checkpointing recompute under ``mode`` too: a function mode is not
    active inside backward, where the recomputation runs (real autocast is restored there
    by the checkpoint itself)."""
    for m in part.modules():
        if isinstance(m, CheckpointWrapper):
            m.checkpoint_fn = functools.partial(
                m.checkpoint_fn, context_fn=lambda: (contextlib.nullcontext(), mode))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _shards(parts) -> list[LocalParam]:
    out = []
    for part in parts:
        for name, p in part.named_parameters():
            local = _local(p)
            out.append(LocalParam(name.replace(_CHECKPOINT_PREFIX, ""), tuple(local.shape),
                                  str(local.dtype).removeprefix("torch."),
                                  local.numel() * local.element_size()))
    return out


# ----------------------------------------------------------------------------- memory
class _SavedTensors:
    """Unique storages one stage's forward saves for backward, keyed by storage identity.

    A storage is a parameter's when a module held a parameter on it during the forward
    (for FSDP, the gathered weight); the rest are activations. Saved tensors stay referenced
    until ``release``, so no storage identity is reused meanwhile. Under activation
    checkpointing the hooks see nothing inside a block: each block's inputs are recorded
    instead, which is what the checkpoint keeps.
    """

    def __init__(self):
        self._seen: dict[int, tuple[int, str, tuple[int, ...], str]] = {}
        self._params: set[int] = set()
        self._refs: list[torch.Tensor] = []

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        return _local(t).untyped_storage()._cdata

    def _add(self, t: torch.Tensor) -> None:
        key = self._key(t)
        if key not in self._seen:
            node = t.grad_fn or (t._base.grad_fn if t._base is not None else None)
            local = _local(t)
            self._seen[key] = (local.untyped_storage().nbytes(),
                               type(node).__name__ if node is not None else "leaf",
                               tuple(local.shape), str(t.dtype).removeprefix("torch."))
            self._refs.append(t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._add(t)
        return t

    def _module_params(self, module, args, out) -> None:
        for p in module._parameters.values():
            if p is not None:
                self._params.add(self._key(p))

    @contextlib.contextmanager
    def recording(self, part: nn.Module):
        def block_inputs(module, args, kwargs):
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor):
                    self._add(a)

        handles = [m.register_forward_pre_hook(block_inputs, with_kwargs=True)
                   for m in part.modules() if isinstance(m, CheckpointWrapper)]
        handles.append(nn.modules.module.register_module_forward_hook(self._module_params))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()

    def activations(self) -> list[tuple[int, str, tuple[int, ...], str]]:
        return [v for k, v in self._seen.items() if k not in self._params]

    def activation_bytes(self) -> int:
        return sum(v[0] for v in self.activations())

    def release(self) -> None:
        self._refs.clear()


def _breakdown(saved: list[_SavedTensors]) -> tuple[SavedGroup, ...]:
    groups: dict[tuple, int] = defaultdict(int)
    for s in saved:
        for nbytes, op, shape, dtype in s.activations():
            groups[(op, shape, dtype, nbytes)] += 1
    rows = [SavedGroup(op, shape, dtype, nbytes, n)
            for (op, shape, dtype, nbytes), n in groups.items()]
    return tuple(sorted(rows, key=lambda g: (-g.bytes * g.count, g.op, g.shape)))


# ----------------------------------------------------------------------------- subprocess
def _child(conn, workload: Workload, layout: Layout, rank: int) -> None:
    try:
        conn.send(("ok", _dry_run_here(workload, layout, rank)))
    except BaseException as e:  # the parent re-raises it with the child's traceback
        conn.send(("error", e, traceback.format_exc()))
    finally:
        conn.close()


def _spawned(workload: Workload, layout: Layout, rank: int, timeout: float) -> DryRunReport:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, workload, layout, rank), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"the dry run of rank {rank} did not finish in {timeout:.0f} s")
        try:
            msg = parent.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"the dry run of rank {rank} died (exit code "
                               f"{proc.exitcode})") from None
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if msg[0] == "error":
        _, exc, tb = msg
        if isinstance(exc, FoldError):
            raise exc
        raise RuntimeError(f"the dry run of rank {rank} failed:\n{tb}") from exc
    return msg[1]
