"""Run this rank's pipeline stages with one of torch.distributed.pipelining's schedules.

Dimension legend: b this data-parallel replica's sequences per step, m sequences per
micro-batch (b = n·m for n micro-batches), S sequence length, H hidden, V vocabulary.

What crosses a stage boundary is a plain tensor, this rank's own block of the residual
stream ``[m, S/(cp·tp), H]``: rank (dp d, cp c, tp t) of stage s sends to rank (d, c, t) of
stage s + 1 over ``fm["pp"]``, and receives the gradient of the same block back. Plain
tensors work on every torch that has the schedules (torch 2.11 cannot send DTensors; 2.13
can but needs the receiver's mesh), and they are what a stage's DTensor layers see anyway:
between blocks the residual stream is each rank's sequence shard.

Every stage is built with its input and output shapes given (``input_args`` /
``output_args`` on the meta device), so torch runs no shape-inference pass: an extra
forward would route a micro-batch (or zeros) through the routers and corrupt their expert
counts, global-aux statistics and bias updates. The shapes are then fixed: ``step`` refuses
a batch of another shape with an error instead of a mismatched receive.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage

from .._fold import FoldError
from .._mesh import FoldedMesh
from .._sequence import _cp_chunks
from ..loss import local_cross_entropy
from ..moe import Router
from ._schedules import SCHEDULES, check_pipeline, schedule_class
from ._split import stage_indices

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _default_loss(fm: FoldedMesh, microbatches: int) -> LossFn:
    """Mean token cross-entropy of a micro-batch divided by the number of micro-batches:
    the gradient of a step is then the mean over its micro-batches (``scale_grads=False``)."""

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return local_cross_entropy(logits, _cp_chunks(labels, fm), fm) / microbatches

    return loss_fn


class _CastOutput:
    """A stage's output in the dtype its receiver expects (a no-op when it already is):
    under autocast the residual stream stays fp32 while the logits come out in bf16."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, module, args, out):
        return out.to(self.dtype)


class Pipeline:
    """This rank's stages of a pipeline and the schedule that runs them.

    Attributes:
        parts: this rank's stage modules (``split_model``'s, parallelized, maybe FSDP).
        stages: the ``PipelineStage`` of each part.
        schedule: the torch schedule.
        microbatches: n, micro-batches per ``step``.
        shape: ``(b, S)``, the token rows one ``step`` takes.
        has_first / has_last: whether this rank runs the first / last stage.
    """

    def __init__(self, parts, stages, schedule, fm: FoldedMesh, microbatches: int,
                 shape: tuple[int, int], loss_fn: LossFn, hidden: tuple[int, int, int],
                 dtype: torch.dtype, owner: list[int]):
        self.parts, self.stages, self.schedule = parts, stages, schedule
        self.fm, self.microbatches, self.shape = fm, microbatches, shape
        self._loss, self._hidden, self._dtype, self._owner = loss_fn, hidden, dtype, owner
        self.has_first = any(s.is_first for s in stages)
        self.has_last = any(s.is_last for s in stages)
        self._return_outputs = "return_outputs" in inspect.signature(schedule.step).parameters

    def _check(self, ids: torch.Tensor | None, labels: torch.Tensor | None) -> None:
        for name, t in (("input ids", ids), ("labels", labels)):
            if t is not None and tuple(t.shape) != self.shape:
                raise FoldError(
                    f"the pipeline was built for {self.shape[0]} sequences of {self.shape[1]} "
                    f"tokens per step ({self.microbatches} micro-batches), got {name} of shape "
                    f"{tuple(t.shape)}: stage buffers have fixed shapes; keep the batch and "
                    "sequence length fixed (pad), or build the pipeline again for the new shape")

    def _run(self, fn, ids, labels) -> torch.Tensor:
        self._check(ids, labels)
        losses: list[torch.Tensor] = []
        args = (ids,) if self.has_first else ()
        kw = dict(target=labels if self.has_last else None, losses=losses)
        if self._return_outputs:
            kw["return_outputs"] = False  # the logits of every micro-batch are not needed
        fn(*args, **kw)
        device = self.stages[0].device
        total = torch.stack(losses).sum().detach().float() if losses else torch.zeros(
            (), device=device)
        if self.fm.fold.pp > 1:  # the last stage's loss, on every rank of the pipeline
            dist.all_reduce(total, group=self.fm["pp"].get_group())
        return total

    def step(self, ids: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        """One training step's forward and backward over all micro-batches.

        Args:
            ids / labels: this data-parallel replica's ``[b, S]`` int64 token ids and labels
                (read on every rank of the replica; only the first / last stage uses them).

        Returns:
            fp32 scalar, the same on every rank of the pipeline: the mean over micro-batches
            of this rank's mean token loss (what ``foldmesh.cross_entropy`` gives without
            pp). Gradients are accumulated into the parts (reduced by FSDP at the end of the
            step; with replication call ``foldmesh.reduce_gradients(pipeline.parts, fm)``).
        """
        return self._run(self.schedule.step, ids, labels)

    @torch.no_grad()
    def eval(self, ids: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        """The same loss as ``step``, forward only; put the parts in eval mode first (the
        routers then neither count nor add balancing losses).

        Micro-batches go through the stages one after the other with blocking sends over
        ``fm["pp"]``, not through the training schedule: torch's ``eval`` cannot run the V
        schedules, and on torch 2.11 an ``eval`` before the first training step leaves the
        receive buffers without gradients for good. Validation does not need overlap.
        """
        self._check(ids, labels)
        n, m = self.microbatches, self.shape[0] // self.microbatches
        group = self.fm["pp"].get_group()
        me = self.fm.coordinate("pp")
        mine = {s.stage_index: (s, part) for s, part in zip(self.stages, self.parts, strict=True)}
        last = self.stages[0].num_stages - 1
        device = self.stages[0].device
        total = torch.zeros((), device=device)
        for i in range(n):
            rows = slice(i * m, (i + 1) * m)
            x = None
            for s in range(last + 1):
                if s not in mine:
                    continue
                stage, part = mine[s]
                if s == 0:
                    x = ids[rows]
                elif self._owner[s - 1] != me:
                    x = torch.empty(self._hidden, dtype=self._dtype, device=device)
                    dist.recv(x, src=dist.get_global_rank(group, self._owner[s - 1]),
                              group=group)
                x = part(x)
                if s == last:
                    total += self._loss(x, labels[rows]).float()
                elif self._owner[s + 1] != me:
                    dist.send(x.contiguous(), dst=dist.get_global_rank(group, self._owner[s + 1]),
                              group=group)
        if self.fm.fold.pp > 1:
            dist.all_reduce(total, group=group)
        return total


def apply_pipeline(parts: list[nn.Module], fm: FoldedMesh, *, schedule: str,
                   microbatches: int, microbatch_size: int, seq_len: int,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                   loss_fn: LossFn | None = None) -> Pipeline:
    """Build the stages and the schedule for this rank's ``parts`` (from ``split_model``,
    each parallelized, materialised, and wrapped by FSDP or left for replication).

    Args:
        parts: this rank's stages, ordered as ``split_model`` returns them.
        fm: the folded mesh (pp > 1).
        schedule: a name from ``SCHEDULES``; the one the parts were split for.
        microbatches: n, micro-batches per step.
        microbatch_size: m, sequences per micro-batch of this data-parallel replica.
        seq_len: S, tokens per sequence.
        dtype: dtype of the residual stream between stages and of the last stage's logits
            (the compute dtype: bf16 under FSDP mixed precision, else fp32).
        device: this rank's device.
        loss_fn: ``loss_fn(local_logits [m, S/cp, V/tp], labels [m, S])`` of a micro-batch;
            default: the vocabulary-parallel mean cross-entropy divided by n, so that the
            step's gradient is the mean over micro-batches, the convention of
            ``foldmesh.data_parallel``; the routers' balancing losses are then scaled alike
            (``loss_scale = cp / n``, what accumulation does without pp). A custom loss sets
            the routers' ``loss_scale`` itself.

    Raises:
        FoldError: a schedule the parts or the micro-batches do not fit.
    """
    f = fm.fold
    check_pipeline(schedule, f.pp, len(parts), microbatches)
    cfg = parts[0].config
    num_stages = f.pp * len(parts)
    device = torch.device(device)
    group = fm["pp"].get_group()
    hidden = (microbatch_size, seq_len // (f.cp * f.tp), cfg.hidden_size)
    logits = (microbatch_size, seq_len // f.cp, cfg.vocab_size // f.tp)

    def meta(shape, dt, grad):
        return torch.empty(shape, dtype=dt, device="meta", requires_grad=grad)

    stages = []
    for part in parts:
        s = part.pipeline_stage
        first, last = s == 0, s == num_stages - 1
        inputs = meta((microbatch_size, seq_len), torch.int64, False) if first \
            else meta(hidden, dtype, True)
        outputs = meta(logits if last else hidden, dtype, True)
        part.register_forward_hook(_CastOutput(dtype))
        stages.append(PipelineStage(part, s, num_stages, device, input_args=inputs,
                                    output_args=outputs, group=group))
    cls = schedule_class(schedule)
    loss = loss_fn or _default_loss(fm, microbatches)
    if loss_fn is None:
        for part in parts:
            for r in (m for m in part.modules() if isinstance(m, Router)):
                r.loss_scale = f.cp / microbatches
    # scale_grads=False: the loss is already divided by the micro-batches (torch's default
    # would divide the gradients by n once more after the step).
    if SCHEDULES[schedule].multi:
        sched = cls(stages, n_microbatches=microbatches, loss_fn=loss, scale_grads=False)
    else:
        sched = cls(stages[0], n_microbatches=microbatches, loss_fn=loss, scale_grads=False)
    style = SCHEDULES[schedule].style
    owner = [0] * num_stages  # the pp rank of every stage
    for r in range(f.pp):
        for s in stage_indices(r, f.pp, len(parts), style):
            owner[s] = r
    return Pipeline(parts, stages, sched, fm, microbatches,
                    (microbatch_size * microbatches, seq_len), loss, hidden, dtype, owner)
