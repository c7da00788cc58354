"""One layout's estimate: memory by term, step time by part, tokens/s and MFU.

The estimate is taken on the first rank of every pipeline rank (within a stage, ranks
differ only by FSDP's last, shorter chunks) and reported for the worst one: the most memory
and the slowest micro-batch, which the whole pipeline waits for.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from ..train.flops import flops_per_token
from ._activations import activation_memory
from ._comm import Collective, step_collectives
from ._hardware import GIB, Hardware
from ._memory import Memory, gathered_bytes, state_bytes
from ._params import stages_of
from ._time import (
    bubble_slots,
    collective_time,
    compute_parts,
    compute_seconds,
    crosses_nodes,
    head_work,
    layer_work,
    optimizer_seconds,
)
from ._workload import Layout, Workload

# which step-time part a collective belongs to
CATEGORY = {"tp": "tp", "cp": "cp", "cp_tp": "tp", "ep": "ep", "etp": "etp", "ep_etp": "ep",
            "dp_cp": "dp", "dp": "dp", "edp": "edp", "dp_cp_tp": "dp", "pp": "pp",
            "world": "dp"}


@dataclass(frozen=True)
class Estimate:
    """The planner's prediction for one layout (per GPU unless said otherwise)."""

    workload: Workload
    layout: Layout
    hardware: Hardware
    memory: Memory
    """The rank with the most memory."""
    fits: bool
    limit: str
    """The largest memory term when it does not fit, else ""."""
    step_time: float
    """Seconds per optimizer step."""
    time: dict
    """Seconds per step by part: compute, exposed tp/cp/ep/etp/dp/edp/pp, bubble, optimizer."""
    comm_bytes: dict
    """Bytes per step sent by the worst rank, by collective group (tp, ep, dp_cp, ...)."""
    cross_node: tuple
    """The groups whose ranks span more than one node."""
    tokens_per_s_per_gpu: float
    mfu: float
    """Model FLOPs (foldmesh.train.flops, causal attention) per second / peak."""
    mfu_megatron: float
    """The same with Megatron's FLOPs formula (full attention), as the paper reports MFU."""
    collectives: list = field(default_factory=list, compare=False, repr=False)
    compute_parts: dict = field(default_factory=dict, compare=False, repr=False)
    """``time["compute"]`` by kernel kind (dense GEMMs, grouped GEMMs per pass and shape
    class, attention, permute, elementwise), at the hardware's measured rates or its
    calibrated fractions."""

    def largest_term(self) -> tuple[str, float]:
        """(name, seconds per step) of the largest part of the step time, with compute
        split by kernel kind and communication named as exposed collectives."""
        terms = {(f"exposed {k} collectives" if k in CATEGORY.values() else k): v
                 for k, v in self.time.items() if k != "compute"}
        terms |= self.compute_parts or {"compute": self.time.get("compute", 0.0)}
        return max(terms.items(), key=lambda kv: kv[1])

    def to_dict(self) -> dict:
        f = self.layout.fold
        return {
            "fold": {a: f.size(a) for a in ("tp", "cp", "dp", "pp", "etp", "ep", "edp")},
            "vpp": self.layout.stages_per_rank, "mbs": self.layout.micro_batch,
            "schedule": self.layout.schedule if f.pp > 1 else None,
            "pp_layers": list(self.layout.pp_layers) or None,
            "activation_checkpoint": self.layout.activation_checkpoint,
            "data_parallel": self.layout.data_parallel,
            "microbatches": self.layout.microbatches(self.workload),
            "fits": self.fits, "limit": self.limit,
            "memory_gib": {k: v / GIB for k, v in self.memory.terms().items()}
            | {"total": self.memory.total / GIB,
               "available": self.hardware.usable_bytes / GIB},
            "step_time_s": self.step_time if math.isfinite(self.step_time) else None,
            "time_s": dict(self.time),
            "comm_bytes": dict(self.comm_bytes),
            "cross_node": list(self.cross_node),
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "mfu": self.mfu, "mfu_megatron": self.mfu_megatron,
            "kernels": self.hardware.kernels, "compute_s": dict(self.compute_parts),
        }


def _rank_memory(workload: Workload, layout: Layout, rank: int) -> Memory:
    weights, grads, opt = state_bytes(workload, layout, rank)
    act = activation_memory(workload, layout, rank)
    # the MoE dispatch's saved rows and indices, over every micro-batch in flight
    dispatch = round(act.by_part.get("dispatch", 0) * act.inflight)
    return Memory(weights=weights, gradients=grads, optimizer=opt,
                  gathered=gathered_bytes(workload, layout, rank),
                  activations=act.total - act.pipeline_buffers - dispatch, dispatch=dispatch,
                  pipeline=act.pipeline_buffers,
                  detail={"activations_by_part": dict(act.by_part), "inflight": act.inflight,
                          "recompute_peak": act.recompute_peak})


def _rank_time(workload: Workload, layout: Layout, hw: Hardware, rank: int,
               colls: list[Collective]) -> tuple[dict, dict]:
    """Seconds per step of one rank by part, before the bubble, and its compute by kernel
    kind."""
    cfg, f = workload.model, layout.fold
    n = layout.microbatches(workload)
    passes = 4.0 if layout.activation_checkpoint == "full" else 3.0
    pp_rank = rank // f.stage_size
    compute = 0.0
    parts: dict[str, float] = defaultdict(float)
    last = layout.num_stages - 1 if f.pp > 1 else 0
    for stage, layers in stages_of(cfg, layout, pp_rank):
        for moe in (False, True):  # layers of one kind cost the same
            same = [i for i in layers if cfg.is_moe(i) == moe]
            if same:
                work = layer_work(cfg, f, workload, layout.micro_batch, same[0],
                                  hw.gemm_half_size)
                compute += len(same) * compute_seconds(work, hw, passes)
                for k, v in compute_parts(work, hw, passes).items():
                    parts[k] += len(same) * v * n
        if stage == last:
            work = head_work(cfg, f, workload, layout.micro_batch, hw.gemm_half_size)
            compute += compute_seconds(work, hw, 3)
            for k, v in compute_parts(work, hw, 3).items():
                parts[k] += v * n
    out: dict[str, float] = defaultdict(float)
    out["compute"] = compute * n
    fsdp_gather = fsdp_reduce = 0.0
    links: dict = {}
    for c in colls:
        t = collective_time(c, f, hw, links)
        if c.kind == "all_to_all":  # the dispatch: the busiest expert's rank receives most
            t *= workload.load_factor
        cat = CATEGORY.get(c.group, "dp")
        if c.scope == "step" and c.what.startswith("FSDP"):
            if c.kind == "all_gather":
                fsdp_gather += t
            else:
                fsdp_reduce += t
            # gradient sync: its tp partial sums count with the dense gradients (dp)
            out["_edp" if c.group == "edp" else "_dp"] += t
        else:
            out[cat] += t
    groups = max(1, sum(1 for c in colls if c.what.startswith("FSDP")
                        and c.kind == "reduce_scatter"))
    fsdp = fsdp_gather + fsdp_reduce
    if f.pp == 1:  # overlapped with compute, except what exceeds it and one group each way
        exposed = max(fsdp - out["compute"], fsdp / groups)
    else:
        # gathers overlap the first micro-batch's forward (a third of its compute); the
        # reduce-scatters run after the stage's last backward, during the pipeline's drain
        exposed = max(0.0, fsdp_gather - out["compute"] / n / 3) + fsdp_reduce
        out["_drain"] = fsdp_reduce
    for cat in ("dp", "edp"):  # the exposed FSDP time, split as the collectives' times
        share = out.pop(f"_{cat}", 0.0)
        out[cat] += exposed * share / fsdp if fsdp else 0.0
    # send/recv are asynchronous: in steady state they overlap the next micro-batch; the
    # pipeline's fill and drain wait for one message per boundary each way
    if out.get("pp"):
        per_message = out["pp"] / max(1, sum(c.count for c in colls if c.scope == "p2p"))
        out["pp"] = 2 * (f.pp - 1) * per_message
    return dict(out), {k: v for k, v in parts.items() if v}


def static_estimate(workload: Workload, layout: Layout, hw: Hardware) -> Estimate | None:
    """None when the weights, gradients, optimizer state and gathered weights fit in HBM;
    otherwise an estimate of that memory alone (no time: it cannot run)."""
    f = layout.fold
    worst = None
    for rank in {0, (f.pp - 1) * f.stage_size}:
        w, g, o = state_bytes(workload, layout, rank)
        m = Memory(w, g, o, gathered=gathered_bytes(workload, layout, rank))
        worst = m if worst is None or m.total > worst.total else worst
    if worst.total <= hw.usable_bytes:
        return None
    limit = max(worst.terms().items(), key=lambda kv: kv[1])[0]
    return Estimate(workload=workload, layout=layout, hardware=hw, memory=worst, fits=False,
                    limit=limit, step_time=math.inf, time={}, comm_bytes={}, cross_node=(),
                    tokens_per_s_per_gpu=0.0, mfu=0.0, mfu_megatron=0.0)


def estimate(workload: Workload, layout: Layout, hw: Hardware) -> Estimate:
    """Memory, step time, tokens/s and MFU of ``layout`` (see the module docstring)."""
    cfg, f = workload.model, layout.fold
    n = layout.microbatches(workload)
    # the first pp rank (most micro-batches in flight), the last (the head) and the one
    # with the most layers (the slowest stage)
    depth = [sum(len(r) for _, r in stages_of(cfg, layout, p)) for p in range(f.pp)]
    chosen = sorted({0, f.pp - 1, max(range(f.pp), key=lambda p: depth[p])})
    firsts = [p * f.stage_size for p in chosen]
    mems, times, parts, colls = [], [], [], {}
    for rank in firsts:
        c = step_collectives(workload, layout, rank)
        colls[rank] = c
        mems.append(_rank_memory(workload, layout, rank))
        t, p = _rank_time(workload, layout, hw, rank, c)
        times.append(t)
        parts.append(p)
    memory = max(mems, key=lambda m: m.total)
    critical = ("compute", "tp", "cp", "ep", "etp", "pp")  # per micro-batch, on the path
    per_mb = [sum(t.get(k, 0.0) for k in critical) / n for t in times]
    worst = max(range(len(times)), key=lambda i: per_mb[i])
    time = dict(times[worst])
    time["bubble"] = bubble_slots(layout) * per_mb[worst]
    drain = time.pop("_drain", 0.0)  # reduce-scatters hidden in the bubble of the drain
    hidden = min(drain, time["bubble"])
    synced = sum(time.get(c, 0.0) for c in ("dp", "edp"))
    hidden = min(hidden, synced)
    for cat in ("dp", "edp"):
        if hidden and time.get(cat):
            time[cat] -= hidden * time[cat] / synced
    params = memory.weights / 4
    time["optimizer"] = optimizer_seconds(params, hw)
    step = sum(time.values())
    tokens = workload.global_batch * workload.seq_len
    world = f.world_size
    fits = memory.total <= hw.usable_bytes
    limit = "" if fits else max(memory.terms().items(), key=lambda kv: kv[1])[0]
    comm: dict[str, float] = defaultdict(float)
    for c in colls[firsts[worst]]:
        comm[c.group] += c.total
    crossing = tuple(sorted({c.group for cs in colls.values() for c in cs
                             if crosses_nodes(f, c.group, hw.gpus_per_node)}))
    peak = hw.peak_flops * world * step
    return Estimate(
        workload=workload, layout=layout, hardware=hw, memory=memory, fits=fits, limit=limit,
        step_time=step, time=time, comm_bytes=dict(comm), cross_node=crossing,
        tokens_per_s_per_gpu=tokens / step / world,
        mfu=flops_per_token(cfg, workload.seq_len) * tokens / peak,
        mfu_megatron=flops_per_token(cfg, workload.seq_len, causal=False) * tokens / peak,
        collectives=colls[firsts[worst]], compute_parts=parts[worst])
