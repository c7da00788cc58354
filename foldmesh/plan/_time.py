"""Step time: compute from FLOPs and bytes, collectives from an alpha-beta model of the links
the rank order puts them on, the pipeline bubble of each schedule.

**Which groups cross nodes.** Ranks are numbered tp fastest, then cp, dp (attention) and
etp, ep, edp (MoE), pp outermost, with ``gpus_per_node`` consecutive ranks per node. An
axis with stride s and size n (tp: s = 1; cp: tp; dp: tp·cp; etp: 1; ep: etp; edp: etp·ep;
pp: the stage size; flattened names multiply) puts min(n, ceil(gpn/s)) of its ranks on a
node when s < gpn and one per node otherwise.

**Alpha-beta per collective** (bytes X in CollectiveCounter's convention, n ranks, q of
them per node, bw the link's bandwidth times ``link_efficiency``, NVLink within a node and
the GPU's NIC across nodes, whichever the group spans):

* all-gather ``(n-1)·alpha + (n-1)·X / bw``; reduce-scatter ``(n-1)·alpha + (n-1)/n·X / bw``;
  all-reduce twice a reduce-scatter (ring);
* all-to-all: the rows for ranks on the same node go over NVLink and the others through the
  NIC at the same time: ``alpha·n + max((q-1)/(n-1)·X / bw_nvlink, (n-q)/(n-1)·X / bw_net)``;
* send/recv ``alpha + X / bw``.

**Overlap** (what foldmesh does): TP/SP, CP, EP and ETP collectives run on the compute
stream between the kernels that need them and are fully exposed. FSDP2 prefetches the next
group's all-gather and overlaps reduce-scatters with the backward of earlier layers: with
pp = 1 only what exceeds the compute time, and at least one group's gather and one
reduce-scatter, is exposed. With pp > 1 a stage gathers its weights once, during the first
micro-batch's forward (what exceeds a third of that micro-batch's compute is exposed), and
reduce-scatters once after its last backward, while the pipeline drains: what exceeds the
bubble is exposed. Replication's all-reduce runs after backward, exposed. A pipeline's
sends and receives are asynchronous and overlap the next micro-batch in steady state; the
fill and the drain wait for one message per boundary each way, 2·(pp-1) messages a step
(``foldmesh/plan/_estimate.py`` applies these rules).

**Compute.** Matmul FLOPs of the rank (its stages' layers, its tokens, its heads and FFN
shards) at ``matmul_efficiency`` of peak, each GEMM slowed by its shape (a dimension d runs
at d / (d + ``gemm_half_size``) of a large GEMM's rate: small expert GEMMs of fine-grained
MoEs are slower per FLOP), plus the memory-bound kernels (norms, RoPE,
residual adds, router, permute/unpermute, SwiGLU activations, the loss) at
``memory_efficiency`` of HBM bandwidth; backward costs twice the forward, activation
checkpointing adds one forward. These two fractions were fitted on the paper's Table 3,
that is on Megatron-Core's kernels.

**Compute at foldmesh's measured rates** (a preset with ``rates``, ``_rates.py``): each kind
of kernel runs at its own measured rate. Dense GEMMs (attention projections, router, dense
and shared FFNs, the head) at ``dense_gemm_tflops``, which was measured on an 8192^3 GEMM:
other shapes keep the shape curve above relative to 8192^3. The routed experts' grouped
GEMMs at ``grouped_gemm_tflops`` of their ``shape_class`` (rows per expert, K, N), forward
and backward each at its own rate. Attention's QK^T and AV (causal FLOPs) at
``attention_tflops``, permute and unpermute bytes at ``permute_gbps``, every other
memory-bound byte at ``elementwise_gbps``. Backward again costs twice the forward's FLOPs
and bytes, recomputation one more forward.

**Bubble** (micro-batch time t through all of a rank's stages, n micro-batches, v stages per
rank): GPipe and 1F1B ``(pp-1)·t``; Interleaved1F1B and LoopedBFS ``(pp-1)/v·t``
(Narayanan et al., 2021); zero-bubble schedules split backward into input and weight
passes and fill all but about a third of that: ``(pp-1)/(3v)·t`` (Qi et al., 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .._fold import Fold
from .._mesh import FLATTENED
from ..models import ModelConfig
from ._comm import Collective, group_size
from ._hardware import Hardware
from ._rates import SHAPE_CLASSES, shape_class
from ._workload import Layout, Workload

STRIDE_OF = {"tp": lambda f: 1, "cp": lambda f: f.tp, "dp": lambda f: f.tp * f.cp,
             "etp": lambda f: 1, "ep": lambda f: f.etp, "edp": lambda f: f.etp * f.ep,
             "pp": lambda f: f.stage_size}
ZERO_BUBBLE = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
INTERLEAVED = ("Interleaved1F1B", "LoopedBFS")


@lru_cache(maxsize=65536)
def span(fold: Fold, name: str, gpus_per_node: int) -> tuple[int, int]:
    """(ranks per node, nodes) of a group of the fold name ``name``."""
    n = group_size(fold, name)
    if name == "world":
        stride = 1
    elif name in FLATTENED:
        stride = STRIDE_OF[FLATTENED[name][1][-1]](fold)  # the fastest axis of the group
        # a flattened group is contiguous in stride steps only when its inner axes are
        # complete, which they are: dp_cp = (dp, cp) with cp inside dp, etc.
    else:
        stride = STRIDE_OF[name](fold)
    if stride >= gpus_per_node:
        return 1, n
    per_node = min(n, max(1, gpus_per_node // stride))
    return per_node, -(-n // per_node)


def crosses_nodes(fold: Fold, name: str, gpus_per_node: int) -> bool:
    return span(fold, name, gpus_per_node)[1] > 1


@lru_cache(maxsize=65536)
def link(fold: Fold, name: str, hw: Hardware) -> tuple[int, int, float, float, float, float]:
    """(ranks, ranks per node, alpha, bandwidth, NVLink and network bandwidth) of a group."""
    n = group_size(fold, name)
    q, nodes = span(fold, name, hw.gpus_per_node)
    nv = hw.nvlink_bandwidth * hw.link_efficiency
    net = hw.network_bandwidth * hw.link_efficiency
    inter = nodes > 1
    return (n, q if inter else n, hw.network_latency if inter else hw.nvlink_latency,
            net if inter else nv, nv, net)


def collective_time(c: Collective, fold: Fold, hw: Hardware, links: dict | None = None
                    ) -> float:
    """Seconds of ``c.count`` calls of one collective (see the module docstring); ``links``
    caches ``link`` per group for a caller timing many collectives of one fold."""
    lk = links.get(c.group) if links is not None else None
    if lk is None:
        lk = link(fold, c.group, hw)
        if links is not None:
            links[c.group] = lk
    n, q, alpha, bw, nv, net = lk
    x = c.bytes
    if c.kind == "all_gather":
        t = (n - 1) * alpha + (n - 1) * x / bw
    elif c.kind == "reduce_scatter":
        t = (n - 1) * alpha + (n - 1) / n * x / bw
    elif c.kind == "all_reduce":
        t = 2 * (n - 1) * alpha + 2 * (n - 1) / n * x / bw
    elif c.kind == "all_to_all":
        local = (q - 1) / (n - 1) * x / nv
        remote = (n - q) / (n - 1) * x / net
        t = n * alpha + max(local, remote)
    else:  # send / recv
        t = alpha + x / bw
    return t * c.count


@dataclass(frozen=True)
class Work:
    """One micro-batch's forward on one rank: matmul FLOPs, the same FLOPs weighted by each
    GEMM's shape efficiency, and memory-bound bytes; then the same split by kernel kind for
    measured rates (see the module docstring)."""

    flops: float
    weighted: float
    bytes: float
    dense: float = 0.0
    """Dense GEMMs' FLOPs / shape efficiency (weighted as above)."""
    grouped: tuple[tuple[str, float, float], ...] = ()
    """(shape class, FLOPs, weighted FLOPs) of the routed experts' grouped GEMMs, per class."""
    attention: float = 0.0
    """Causal QK^T and AV FLOPs."""
    permute: float = 0.0
    """Permute and unpermute bytes (part of ``bytes``)."""


def _gemm(m: float, n: float, k: float, half: float) -> tuple[float, float]:
    """(FLOPs, FLOPs / shape efficiency) of an [m, k] x [k, n] GEMM: a dimension d reaches
    d / (d + half) of a large GEMM's rate (tile quantisation, too little work per tile)."""
    flops = 2 * m * n * k
    eff = 1.0
    for d in (m, n, k):
        eff *= d / (d + half)
    return flops, flops / eff if eff > 0 else 0.0


def _split(gemms: list, core: float, elements: float, permute: float, e: float) -> Work:
    """A ``Work`` from GEMMs ``(FLOPs, weighted, shape class or None for dense)``."""
    flops = sum(g[0] for g in gemms) + core
    grouped = {c: [0.0, 0.0] for c in SHAPE_CLASSES}
    for f, w, c in gemms:
        if c is not None:
            grouped[c][0] += f
            grouped[c][1] += w
    return Work(flops, sum(g[1] for g in gemms) + core, elements * e,
                dense=sum(g[1] for g in gemms if g[2] is None),
                grouped=tuple((c, f, w) for c, (f, w) in grouped.items() if f),
                attention=core, permute=permute * e)


def layer_work(cfg: ModelConfig, fold: Fold, workload: Workload, micro_batch: int,
               layer: int, half: float = 0.0) -> Work:
    """Forward work of one layer on one rank for one micro-batch (see the module docs);
    ``half`` is the hardware's ``gemm_half_size``."""
    s, h, e = workload.seq_len, cfg.hidden_size, workload.act_bytes
    d, hq, hkv = cfg.resolved_head_dim, cfg.num_heads, cfg.num_kv_heads
    seq = micro_batch * s / fold.cp  # tokens of the rank's cp block
    t = seq / fold.tp  # the rank's own tokens
    if cfg.is_mla:
        gemms, core, elements = _mla_work(cfg, fold, micro_batch, s, half)
    else:
        gemms = [(*_gemm(seq, (hq + 2 * hkv) * d / fold.tp, h, half), None),  # q, k, v
                 (*_gemm(seq, h, hq * d / fold.tp, half), None)]  # o
        core = 2 * micro_batch * s * s * d * hq / (fold.cp * fold.tp)  # causal QK^T and AV
        # norms, RoPE, residual adds, attention's softmax traffic: element reads and writes
        elements = 10 * t * h + 4 * seq * (hq + hkv) * d / fold.tp
    permute = 0.0
    if cfg.is_moe(layer):
        k, f = cfg.topk, cfg.expert_ffn_size
        gemms.append((*_gemm(t, cfg.num_experts, h, half), None))  # router
        # each rank runs its El experts on the rows of its etp group: etp * T * k rows in
        # balance, each expert's FFN split over etp
        local = cfg.num_experts // fold.ep
        # the busiest expert's rank gates the step (Workload.expert_imbalance)
        rows = fold.etp * t * k / local * workload.load_factor
        up = (*_gemm(rows, f / fold.etp, h, half), shape_class(rows, h, f / fold.etp))
        down = (*_gemm(rows, h, f / fold.etp, half), shape_class(rows, f / fold.etp, h))
        for _ in range(local):
            gemms += [up] * 2 + [down]
        if cfg.shared_ffn_size:
            gemms += [(*_gemm(seq, cfg.shared_ffn_size / fold.tp, h, half), None)] * 2
            gemms += [(*_gemm(seq, h, cfg.shared_ffn_size / fold.tp, half), None)]
            elements += 4 * seq * cfg.shared_ffn_size / fold.tp
        # permute + unpermute of k copies, SwiGLU on [rows, F/etp] x etp, router scores
        permute = 4 * t * k * h
        elements += permute + 3 * t * k * f + 4 * t * cfg.num_experts
    else:
        gemms += [(*_gemm(seq, cfg.ffn_size / fold.tp, h, half), None)] * 2
        gemms += [(*_gemm(seq, h, cfg.ffn_size / fold.tp, half), None)]
        elements += 3 * seq * cfg.ffn_size / fold.tp
    return _split(gemms, core, elements, permute, e)


def _mla_work(cfg: ModelConfig, fold: Fold, micro_batch: int, s: int, half: float
              ) -> tuple[list, float, float]:
    """Multi-head Latent Attention's GEMMs, causal core and element traffic on one rank
    (cp = 1; ``parallelize._mla_plan``): the down-projections run on the rank's own t
    tokens with whole weights, the up-projections and o_proj on the gathered sequence with
    this rank's Hq/tp heads. Legend: Rq, Rkv latent sizes, Dn, Dr, Dv head sizes."""
    h, hq, tp = cfg.hidden_size, cfg.num_heads / fold.tp, fold.tp
    rkv, dn, dr, dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, \
        cfg.v_head_dim
    seq = micro_batch * s / fold.cp
    t = seq / tp
    if cfg.q_lora_rank is None:
        gemms = [(*_gemm(seq, hq * (dn + dr), h, half), None)]  # q_proj
        latents = 0.0
    else:
        rq = cfg.q_lora_rank
        gemms = [(*_gemm(t, rq, h, half), None),  # q_a_proj
                 (*_gemm(seq, hq * (dn + dr), rq, half), None)]  # q_b_proj
        latents = t * rq  # q_a_norm
    gemms += [(*_gemm(t, rkv + dr, h, half), None),  # kv_a_proj
              (*_gemm(seq, hq * (dn + dv), rkv, half), None),  # kv_b_proj
              (*_gemm(seq, h, hq * dv, half), None)]  # o_proj
    # causal QK^T over Dn + Dr and AV over Dv (foldmesh.train.flops counts the same)
    core = micro_batch * s * s * hq * (dn + dr + dv) / fold.cp
    # norms and residual adds on the rank's tokens; kv_a_norm on the gathered latent;
    # RoPE, the q/k concatenations and the softmax traffic on this rank's heads
    elements = 10 * t * h + 4 * (latents + seq * rkv) + 8 * seq * hq * (dn + dr)
    return gemms, core, elements


def head_work(cfg: ModelConfig, fold: Fold, workload: Workload, micro_batch: int,
              half: float = 0.0) -> Work:
    seq = micro_batch * workload.seq_len / fold.cp
    v = cfg.vocab_size / fold.tp
    # logits matmul; the loss reads the fp32 logits a few times (max, exp-sum, pick)
    flops, weighted = _gemm(seq, v, cfg.hidden_size, half)
    return Work(flops, weighted, 4 * seq * v * 4, dense=weighted)


def compute_seconds(work: Work, hw: Hardware, passes: float) -> float:
    """``passes`` forward-equivalents (3: forward + backward; 4 with recomputation)."""
    if hw.rates is not None:
        return sum(compute_parts(work, hw, passes).values())
    return passes * (work.weighted / (hw.peak_flops * hw.matmul_efficiency)
                     + work.bytes / (hw.hbm_bandwidth * hw.memory_efficiency))


def compute_parts(work: Work, hw: Hardware, passes: float) -> dict[str, float]:
    """``compute_seconds`` by kernel kind: dense GEMMs, grouped GEMMs per pass and shape
    class, attention, permute, elementwise (``passes - 2`` forwards and one backward)."""
    fwd, bwd = passes - 2, 2.0
    r = hw.rates
    if r is None:  # the calibrated fractions (their sum is compute_seconds up to rounding)
        gemm, mem = hw.peak_flops * hw.matmul_efficiency, hw.hbm_bandwidth * hw.memory_efficiency
        dense_rate = attention = gemm
        permute = elementwise = mem
        anchor = 1.0
    else:
        dense_rate, attention = r.dense_gemm, r.attention
        permute, elementwise = r.permute, r.elementwise
        ref = _gemm(8192, 8192, 8192, hw.gemm_half_size)  # the shape the rate was measured on
        anchor = ref[0] / ref[1]  # its shape efficiency, which the measured rate includes
    out = {"dense GEMMs": passes * work.dense * anchor / dense_rate}
    for c, flops, weighted in work.grouped:
        if r is None:
            out[f"grouped GEMMs fwd ({c})"] = fwd * weighted / gemm
            out[f"grouped GEMMs bwd ({c})"] = bwd * weighted / gemm
        else:
            out[f"grouped GEMMs fwd ({c})"] = fwd * flops / r.grouped(c)
            out[f"grouped GEMMs bwd ({c})"] = bwd * flops / r.grouped(c, backward=True)
    out["attention"] = passes * work.attention / attention
    out["permute"] = passes * work.permute / permute
    out["elementwise"] = passes * (work.bytes - work.permute) / elementwise
    return out


def optimizer_seconds(params: float, hw: Hardware) -> float:
    """AdamW's step over ``params`` fp32 parameters: 28 bytes each (read parameter,
    gradient and both moments, write parameter and moments), memory-bound."""
    rate = hw.rates.elementwise if hw.rates is not None else (hw.hbm_bandwidth
                                                              * hw.memory_efficiency)
    return 28 * params / rate


def bubble_slots(layout: Layout) -> float:
    """Idle micro-batch times of the pipeline per step (see the module docstring)."""
    pp, v = layout.fold.pp, layout.stages_per_rank
    if pp == 1:
        return 0.0
    if layout.schedule in ZERO_BUBBLE:
        return (pp - 1) / (3 * v)
    if layout.schedule in INTERLEAVED:
        return (pp - 1) / v
    return float(pp - 1)
