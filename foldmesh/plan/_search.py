"""Enumerate the layouts of a workload on a cluster, estimate each, rank them.

A layout is kept when foldmesh can run it: tp divides every size tensor parallelism splits
and stays inside a node; cp splits the sequence into 2·cp chunks divisible over tp; ep
divides the experts and etp the expert FFN; pp·vpp stages each get a layer; the global batch
splits over dp and the micro-batch; the schedule's micro-batch rule holds (the checks of
``foldmesh.parallelize``, ``foldmesh.pipeline`` and ``Fold``).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

from .._fold import Fold, FoldError
from ..pipeline._schedules import SCHEDULES, check_pipeline
from ..pipeline._split import split_layers
from ._estimate import Estimate, estimate, static_estimate
from ._hardware import GIB, Hardware
from ._workload import Layout, Workload


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid(workload: Workload, layout: Layout, batch: bool = True) -> str:
    """Why foldmesh cannot run ``layout`` ("" when it can); ``batch=False`` skips the rules
    on the number of micro-batches (a dry run simulates one)."""
    cfg, f = workload.model, layout.fold
    for name, size in cfg.tp_split_sizes().items():
        if size % f.tp:
            return f"{name} = {size} is not divisible by tp = {f.tp}"
    try:  # the checks foldmesh itself runs: experts over ep, FFN over etp, the split
        if any(cfg.is_moe(i) for i in range(cfg.num_layers)):
            f.check_experts(cfg.num_experts)
            f.check_expert_ffn(cfg.expert_ffn_size)
        if f.pp > 1:
            split_layers(cfg.num_layers, layout.num_stages, layout.pp_layers or None)
    except FoldError as e:
        return str(e)
    split = 2 * f.cp if f.cp > 1 else 1
    if workload.seq_len % split or (workload.seq_len // f.cp) % f.tp:
        return f"seq_len = {workload.seq_len} does not split over cp = {f.cp} and tp = {f.tp}"
    if f.pp > 1 and cfg.tie_embeddings:
        return "tied embeddings cannot be pipelined"
    if not batch:
        return ""
    try:
        n = layout.microbatches(workload)
        if f.pp > 1:
            check_pipeline(layout.schedule, f.pp, layout.stages_per_rank, n)
    except FoldError as e:
        return str(e)
    return ""


def layouts(workload: Workload, gpus: int, hw: Hardware, *, micro_batches=(1, 2, 4),
            activation_checkpoint=("none", "full"), data_parallel=("fsdp", "replicate"),
            max_vpp: int = 8) -> Iterator[Layout]:
    """Every runnable layout of ``gpus`` ranks (see the module docstring)."""
    cfg = workload.model
    for pp in _divisors(gpus):
        stage = gpus // pp
        if pp > cfg.num_layers:
            continue
        for tp in _divisors(stage):
            if tp > hw.gpus_per_node:
                continue
            for cp in _divisors(stage // tp):
                for ep in _divisors(stage):
                    for etp in _divisors(stage // ep):
                        fold = Fold(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp).resolve(gpus)
                        yield from _variants(workload, fold, micro_batches,
                                             activation_checkpoint, data_parallel, max_vpp)


def _variants(workload, fold, micro_batches, acs, dps, max_vpp) -> Iterator[Layout]:
    cfg = workload.model
    if fold.pp == 1:
        schedules = [("1F1B", 1)]
    else:
        schedules = [("1F1B", 1)]
        if "Interleaved1F1B" in SCHEDULES:
            schedules += [("Interleaved1F1B", v) for v in range(2, max_vpp + 1)
                          if cfg.num_layers % (fold.pp * v) == 0]
    for mbs in micro_batches:
        for schedule, vpp in schedules:
            for ac in acs:
                for dp in dps:
                    layout = Layout(fold, micro_batch=mbs, schedule=schedule,
                                    stages_per_rank=vpp, activation_checkpoint=ac,
                                    data_parallel=dp)
                    if not valid(workload, layout):
                        yield layout


def search(workload: Workload, gpus: int, hw: Hardware, *, workers: int | None = None,
           **options) -> list[Estimate]:
    """Every runnable layout's estimate, fitting ones first, fastest first.

    Activation checkpointing only saves memory and costs a forward: a checkpointed layout is
    evaluated only when the same layout without it does not fit. ``workers`` processes
    (default: one per CPU) share the folds; ``options`` go to ``layouts``."""
    by_fold: dict[Fold, list[Layout]] = {}
    for layout in layouts(workload, gpus, hw, **options):
        by_fold.setdefault(layout.fold, []).append(layout)
    chunks = list(by_fold.values())
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    if workers > 1:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            parts = list(pool.map(_evaluate, [(workload, hw, c) for c in chunks],
                                  chunksize=max(1, len(chunks) // (8 * workers))))
    else:
        parts = [_evaluate((workload, hw, c)) for c in chunks]
    out = [e for part in parts for e in part]
    out.sort(key=lambda e: (not e.fits, e.step_time))
    return out


def _evaluate(job: tuple[Workload, Hardware, list[Layout]]) -> list[Estimate]:
    """The estimates of one fold's layouts (see ``search``), without their collective lists
    (they stay in the worker: ``estimate`` gives them for any one layout)."""
    workload, hw, chunk = job
    out, fitting = [], set()
    for layout in chunk:
        if layout.activation_checkpoint != "none" and \
                layout.replace(activation_checkpoint="none") in fitting:
            continue
        e = static_estimate(workload, layout, hw) or estimate(workload, layout, hw)
        if e.fits and layout.activation_checkpoint == "none":
            fitting.add(layout)
        out.append(dataclasses.replace(e, collectives=[]))
    return out


def nothing_fits(workload: Workload, gpus: int, hw: Hardware, estimates: list[Estimate]
                 ) -> str:
    """The error when no layout fits: the limiting term and the GPU count that would fit."""
    if not estimates:
        return (f"no layout of {workload.model.num_layers} layers runs on {gpus} GPUs with "
                f"global batch {workload.global_batch} and sequence {workload.seq_len}: "
                f"check --gpus, --global-batch and --seq-len")
    best = min(estimates, key=lambda e: e.memory.total)
    terms = best.memory.terms()
    limit = max(terms, key=terms.get)
    msg = (f"no layout fits in {hw.usable_bytes / GIB:.0f} GiB per GPU ({hw.name}); the "
           f"smallest needs {best.memory.total / GIB:.1f} GiB, most of it {limit} "
           f"({terms[limit] / GIB:.1f} GiB) at {best.layout.fold}")
    for more in (2 * gpus, 4 * gpus, 8 * gpus):  # the smallest of these that fits
        try:
            found = [e for e in search(workload, more, hw, micro_batches=(1,),
                                       activation_checkpoint=("full",),
                                       data_parallel=("fsdp",)) if e.fits]
        except FoldError:
            found = []
        if found:
            return msg + f"; {more} GPUs would fit (e.g. {found[0].layout.fold})"
    return msg + "; use more GPUs, activation checkpointing or a shorter sequence"
