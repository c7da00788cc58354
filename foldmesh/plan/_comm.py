"""Every collective one rank issues in one training step, predicted from the fold alone.

The prediction is the list foldmesh's own code issues (``foldmesh.testing.CollectiveCounter``
measures the same list; ``tests/plan/test_plan_comm.py`` checks them equal, byte for byte,
on 8 gloo ranks). Bytes follow the counter's convention: the logical payload this rank hands
to the collective (all-gather: its input shard; reduce-scatter: the whole input; all-to-all:
the rows it sends to the other ranks). Legend: b micro-batch, S sequence, T = b·S/(cp·tp)
tokens of a rank, H hidden, k top-k, E experts, El = E/ep local experts, C capacity; MLA
(``ModelConfig.is_mla``): Rq, Rkv the query and key/value latent sizes, Dr the RoPE
key's head size; under cp its latent and RoPE key are all-gathered over cp instead of K
and V (docs/placements.md, "Multi-head Latent Attention").

Per micro-batch and layer (forward; backward mirrors each one: all-gather <-> reduce-scatter
of the same tensor, all-to-all the same rows back):

=========================  =====================  ==========================================
what                       collective, axis       bytes
=========================  =====================  ==========================================
attention / dense MLP in   all-gather, tp         T·H (the normed sequence shard)
o_proj / down_proj out     reduce-scatter, tp     tp·T·H (partial sums)
K and V (cp > 1)           2 all-gathers, cp      b·(Hkv/tp)·(S/cp)·D each
MLA query latent           all-gather, tp         T·Rq (T·H for x when no q_lora_rank)
MLA kv latent c            all-gather, tp         T·Rkv; backward an all-reduce of tp·T·Rkv
MLA RoPE key               all-gather, tp         T·Dr
router losses              all-reduce, cp·tp      (E + 1 [+ b·E]) int64 when a loss is on
router gate gradient       all-reduce, tp (bwd)   E·H (its gradient is a tp partial sum)
expert counts (dropless)   all-gather, ep·etp     E int64
dispatch, combine          all-to-all, ep         rows to other ep ranks · H (2 per layer)
etp gather, scatter        all-to-all, etp        (etp-1)·m·H, m rows after the ep exchange
shared expert (tp > 1)     all-gather + RS, tp    as a dense MLP
embedding out (tp > 1)     reduce-scatter, tp     tp·T·H
head in (tp > 1)           all-gather, tp         T·H
loss (tp > 1)              2 all-reduces, tp      b·S/cp fp32, then twice that
stage boundary (pp > 1)    send / recv, pp        b·S/(cp·tp)·H per micro-batch each way
=========================  =====================  ==========================================

Rows of the MoE exchange: with ``pad_to_capacity`` every rank sends exactly C rows per
expert, so the dispatch sends (ep-1)·El·C rows; otherwise routing is taken as balanced,
T·k·(ep-1)/ep rows (the analytic minimum of Figure 2: a token copy crosses the ep group only
when its expert lives elsewhere, and the etp ranks receive it once each, see docs/planner.md).

Per step: FSDP2 all-gathers each group's shard in forward (and again in backward when it
reshards after forward, i.e. pp = 1), reduce-scatters its gradients once (the last micro-
batch), and all-reduces over tp the gradients that are tp partial sums (norm weights);
replication all-reduces one flat buffer per (group, dtype). The global gradient norm is one
fp64 all-reduce over the world; the trainer adds one fp32 all-reduce of the loss over dp·cp,
a pipeline one over pp, and with ``expert_bias`` (DeepSeek-V3's aux-loss-free balancing)
one of each MoE layer's E int64 counts over dp·cp·tp.

Direction is the autograd engine's (see CollectiveCounter): a recomputed forward
(activation checkpointing) is "backward"; with pp > 1 the pipeline schedule sends, receives
and reduces gradients between its backward calls, so those are "forward".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from .._fold import Fold
from .._mesh import FLATTENED
from ..kernels import capacity_for
from ..pipeline._schedules import schedule_style
from ._params import ParamShard, fsdp_index, rank_params, stages_of
from ._workload import Layout, Workload, rank_coordinates

AXES = ("tp", "cp", "dp", "pp", "ep", "etp", "edp")
INT64, FP32, FP64 = 8, 4, 8


@dataclass(frozen=True)
class Collective:
    """Collectives of one kind that one rank issues, ``count`` times per step.

    Attributes:
        kind: "all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send", "recv".
        group: the fold name of the process group ("tp", "ep_etp", "dp_cp", "world", ...).
        direction: "forward" or "backward", as CollectiveCounter records it.
        bytes: the payload of one call (the counter's convention), per rank.
        count: calls per step.
        what: which part of the model issues it.
        scope: "microbatch" (repeats per micro-batch), "step" (once per step) or "p2p".
    """

    kind: str
    group: str
    direction: str
    bytes: float
    count: int
    what: str
    scope: str

    @property
    def total(self) -> float:
        return self.bytes * self.count


# ----------------------------------------------------------------------------- groups
@lru_cache(maxsize=65536)
def group_size(fold: Fold, name: str) -> int:
    """Ranks in the group of a fold name (an axis, a flattened name, or "world")."""
    if name == "world":
        return fold.world_size
    axes = FLATTENED[name][1] if name in FLATTENED else (name,)
    out = 1
    for a in axes:
        out *= fold.size(a)
    return out


@lru_cache(maxsize=65536)
def axis_label(fold: Fold, name: str) -> str:
    """The ``axis`` CollectiveCounter gives a collective on the group of ``name``.

    A flattened name with at most one axis of size > 1 is that axis' mesh; torch's
    DeviceMesh reuses the default group for every mesh dim spanning the whole world; of the
    names sharing one group the most specific wins (a single axis, then a flattened name,
    then "world"), ties joined by "=" (CollectiveCounter's module docstring).
    """
    if name in FLATTENED:
        axes = FLATTENED[name][1]
        big = [a for a in axes if fold.size(a) > 1]
        if len(big) <= 1:
            return axis_label(fold, big[0] if big else axes[0])
    world = fold.world_size
    if name != "world" and group_size(fold, name) < world:
        return name
    if name != "world" and world == 1:
        return name
    singles = [a for a in AXES if fold.size(a) == world]
    flat = [n for n in FLATTENED if group_size(fold, n) == world
            and sum(fold.size(a) > 1 for a in FLATTENED[n][1]) > 1]
    return "=".join(singles or flat or ["world"])


# ----------------------------------------------------------------------------- the step
class _Step:
    """Collects one rank's collectives; ``add`` skips groups of one rank (the code does)."""

    def __init__(self, fold: Fold):
        self.fold = fold
        self.out: list[Collective] = []
        self.layers = 1  # identical layers of a stage are added once, this many times
        self.size = {n: group_size(fold, n) for n in (*AXES, *FLATTENED, "world")}

    def add(self, kind, group, direction, nbytes, count, what, scope="microbatch",
            always=False):
        count *= self.layers
        if count <= 0 or (not always and self.size[group] == 1):
            return
        self.out.append(Collective(kind, group, direction, nbytes, count, what, scope))

    def pair(self, kind, group, nbytes, count, what, recompute=False):
        """A forward collective and its backward mirror (plus the recomputed forward)."""
        mirror = {"all_gather": ("reduce_scatter", self.size[group]),
                  "reduce_scatter": ("all_gather", 1 / self.size[group]),
                  "all_to_all": ("all_to_all", 1)}[kind]
        self.add(kind, group, "forward", nbytes, count, what)
        self.add(mirror[0], group, "backward", nbytes * mirror[1], count, what + " (grad)")
        if recompute:
            self.add(kind, group, "backward", nbytes, count, what + " (recomputed)")


def _moe_rows(workload: Workload, fold: Fold, tokens: int) -> tuple[float, float]:
    """(rows this rank sends to other ep ranks, rows m it holds after the ep exchange)."""
    cfg = workload.model
    el = cfg.num_experts // fold.ep
    if workload.pad_to_capacity:
        c = capacity_for(tokens, cfg.num_experts, cfg.topk, cfg.capacity_factor)
        return (fold.ep - 1) * el * c, fold.ep * el * c
    copies = tokens * cfg.topk  # balanced: each ep rank receives its share of every rank's
    return copies * (fold.ep - 1) / fold.ep, copies


def step_collectives(workload: Workload, layout: Layout, rank: int = 0, *,
                     microbatches: int | None = None, trainer: bool = True,
                     p2p: bool = True) -> list[Collective]:
    """Every collective global ``rank`` issues in one optimizer step.

    Args:
        workload, layout: what runs and how (see ``foldmesh.plan.Workload``/``Layout``).
        rank: the global rank (its pp rank decides its stages).
        microbatches: override the micro-batches per step (the dry run runs one).
        trainer: include ``foldmesh.train``'s own reductions (the loss over dp·cp and, with
            pp > 1, over pp), not only the library's.
        p2p: include the pipeline's stage-boundary sends and receives.
    """
    cfg, f = workload.model, layout.fold
    n = microbatches if microbatches is not None else layout.microbatches(workload)
    b, s_len, h = layout.micro_batch, workload.seq_len, cfg.hidden_size
    fsdp = layout.data_parallel == "fsdp"
    compute = workload.act_bytes
    # FSDP2 computes in its param_dtype; replication keeps fp32 weights under autocast, so
    # the residual stream and norm outputs stay fp32 while matmul outputs are compute dtype.
    # The MoE layer casts its routed tokens to the compute dtype either way (moe/layer.py):
    # its dispatch, combine and shared-expert input travel in it.
    stream = compute if fsdp else FP32
    weight = compute if fsdp else FP32
    tokens = b * s_len // (f.cp * f.tp)  # T
    seq_block = b * s_len // f.cp  # tokens of this rank's cp block (all tp ranks)
    ac = layout.activation_checkpoint == "full"
    st = _Step(f)
    coords = rank_coordinates(f, rank)
    stages = stages_of(cfg, layout, coords["pp"])
    last = layout.num_stages - 1 if f.pp > 1 else 0
    d, hkv = cfg.resolved_head_dim, cfg.num_kv_heads // f.tp

    def block(i: int, name: str | None = None) -> None:
        _block(i, name or f"layer {i}")

    def _block(i, label) -> None:
        if cfg.is_mla:
            mla(label)
            # cp: the normalised latent and the roped key of the rank's cp block, in the
            # compute dtype (foldmesh/_context_parallel.py, LatentExchange)
            st.pair("all_gather", "cp", f.tp * tokens * (cfg.kv_lora_rank +
                    cfg.qk_rope_head_dim) * compute, n, f"{label} latent + RoPE key", ac)
        else:
            st.pair("all_gather", "tp", tokens * h * stream, n, f"{label} attention in", ac)
            st.pair("all_gather", "cp", b * hkv * (s_len // f.cp) * d * compute, 2 * n,
                    f"{label} K/V", ac)
        # NOTE: measured (torch 2.13, trainer and dry run): under full AC the replay of an
        # MLA block issues no o_proj reduce-scatter; why is not established (see
        # docs/planner.md, "Multi-head Latent Attention")
        st.pair("reduce_scatter", "tp", f.tp * tokens * h * compute, n,
                f"{label} attention out", ac and not cfg.is_mla)
        if not cfg.is_moe(i):
            st.pair("all_gather", "tp", tokens * h * stream, n, f"{label} MLP in", ac)
            st.pair("reduce_scatter", "tp", f.tp * tokens * h * compute, n,
                    f"{label} MLP out", ac)
            return
        moe(i, label)

    def mla(label: str) -> None:
        # parallelize._mla_plan: the down-projections run on the rank's T tokens and the
        # latents are all-gathered (their backward reduce-scatters); without q_lora_rank
        # q_proj gathers x itself. The query latent leaves q_a_norm (fp32 weight times its
        # input under autocast): the stream dtype, like x.
        if cfg.q_lora_rank is None:
            st.pair("all_gather", "tp", tokens * h * stream, n, f"{label} attention in", ac)
        else:
            st.pair("all_gather", "tp", tokens * cfg.q_lora_rank * stream, n,
                    f"{label} query latent", ac)
        # kv_a_proj's output (a linear's: compute dtype) in two all-gathers: the latent c,
        # whose gradient comes back complete from kv_b_proj (all-reduced over tp there, in
        # kv_a_norm's output dtype, then sliced: nothing on the way back), and the RoPE key,
        # whose gradient is a partial sum over this rank's heads (reduce-scattered)
        rkv, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        for direction in ("forward", "backward")[:2 if ac else 1]:
            st.add("all_gather", "tp", direction, tokens * rkv * compute, n,
                   f"{label} kv latent" + (" (recomputed)" if direction == "backward" else ""))
        st.add("all_reduce", "tp", "backward", f.tp * tokens * rkv * stream, n,
               f"{label} kv latent (grad)")
        st.pair("all_gather", "tp", tokens * dr * compute, n, f"{label} RoPE key", ac)

    def moe(i: int, label: str) -> None:
        rc = cfg.router_config()
        passes = 2 if ac else 1
        if rc.seq_aux_loss_coeff > 0 or rc.aux_loss_coeff > 0 or rc.z_loss_coeff > 0:
            stats = cfg.num_experts + 1 + (b * cfg.num_experts if rc.seq_aux_loss_coeff else 0)
            for direction in ("forward", "backward")[:passes]:
                st.add("all_reduce", "cp_tp", direction, stats * INT64, n,
                       f"{label} router losses")
        if rc.global_aux_loss_coeff > 0:
            for direction in ("forward", "backward")[:passes]:
                st.add("all_reduce", "dp_cp_tp", direction, (cfg.num_experts + 1) * INT64, n,
                       f"{label} router global loss")
        st.add("all_reduce", "tp", "backward", cfg.num_experts * h * weight, n,
               f"{label} router gate gradient")
        if workload.dispatcher == "allgather":
            allgather_dispatch(label)
        else:
            alltoall_dispatch(label)
        if cfg.shared_ffn_size:
            st.pair("all_gather", "tp", tokens * h * compute, n, f"{label} shared in", ac)
            st.pair("reduce_scatter", "tp", f.tp * tokens * h * compute, n,
                    f"{label} shared out", ac)

    def alltoall_dispatch(label: str) -> None:
        if not workload.pad_to_capacity:
            for direction in ("forward", "backward")[:2 if ac else 1]:
                st.add("all_gather", "ep_etp", direction, cfg.num_experts * INT64, n,
                       f"{label} expert counts")
        sent, m = _moe_rows(workload, f, tokens)
        st.pair("all_to_all", "ep", sent * h * compute, 2 * n, f"{label} dispatch/combine",
                ac)
        st.pair("all_to_all", "etp", (f.etp - 1) * m * h * compute, 2 * n,
                f"{label} etp gather/scatter", ac)

    def allgather_dispatch(label: str) -> None:
        group, ranks = "ep_etp", f.ep * f.etp
        st.pair("all_gather", group, tokens * h * compute, n, f"{label} tokens", ac)
        # the combine weights are the router's fp32 output whatever the compute dtype
        st.pair("all_gather", group, tokens * cfg.topk * FP32, n, f"{label} probs", ac)
        for direction in ("forward", "backward")[:2 if ac else 1]:
            st.add("all_gather", group, direction, tokens * cfg.topk * INT64, n,
                   f"{label} expert ids")
        st.pair("reduce_scatter", group, ranks * tokens * h * compute, n, f"{label} combine",
                ac)

    # every dense layer of the rank's stages issues the same collectives, so does every MoE one
    held = [i for _, layers in stages for i in layers]
    for moe_layer in (False, True):
        same = [i for i in held if cfg.is_moe(i) == moe_layer]
        if same:
            st.layers = len(same)
            block(same[0], f"{len(same)} {'MoE' if moe_layer else 'dense'} layers"
                  if len(same) > 1 else None)
            st.layers = 1
    for stage, _ in stages:
        if stage == 0:
            st.pair("reduce_scatter", "tp", f.tp * tokens * h * stream, n, "embedding out")
        if stage == last:
            st.pair("all_gather", "tp", tokens * h * stream, n, "head in")
            st.add("all_reduce", "tp", "forward", seq_block * FP32, n, "loss max")
            st.add("all_reduce", "tp", "forward", 2 * seq_block * FP32, n, "loss sums")
        if f.pp > 1 and p2p:
            p2p_messages(st, layout, stage, tokens * h * stream, n)

    # the layout with only what decides the parameters (one cache entry for every
    # micro-batch size, AC mode and data-parallel mode)
    lite = layout.replace(micro_batch=1, activation_checkpoint="none", data_parallel="fsdp")
    if fsdp:
        # FSDP2 accumulates unsharded gradients in its fp32 reduce_dtype while gradient sync
        # is off (earlier micro-batches, or a whole pipeline step): the tp sums are then fp32
        partial = FP32 if (f.pp > 1 or n > 1) else weight
        fsdp_collectives(st, f, rank, (cfg, lite), n, weight, partial)
    else:
        replicate_collectives(st, f, rank_params(cfg, lite, rank))
    st.add("all_reduce", "world", "forward", FP64, 1, "gradient norm", "step")
    if trainer:
        st.add("all_reduce", "dp_cp", "forward", FP32, 1, "trainer loss", "step", always=True)
        if f.pp > 1:
            st.add("all_reduce", "pp", "forward", FP32, 1, "pipeline loss", "step")
        if cfg.expert_bias:  # Router.update_expert_bias after the optimizer step
            st.add("all_reduce", "dp_cp_tp", "forward", cfg.num_experts * INT64,
                   sum(cfg.is_moe(i) for i in held), "expert bias counts", "step")
    return st.out


def p2p_messages(st: _Step, layout: Layout, stage: int, nbytes: float, n: int) -> None:
    """A stage's activation and gradient messages with its neighbours on other pp ranks."""
    f = layout.fold
    style = schedule_style(layout.schedule)

    def owner(s: int) -> int:
        i, r = divmod(s, f.pp)
        return (f.pp - 1 - r) if style == "v" and i % 2 else r

    last = layout.num_stages - 1
    if stage > 0 and owner(stage - 1) != owner(stage):
        st.add("recv", "pp", "forward", nbytes, n, f"stage {stage} activation in", "p2p")
        st.add("send", "pp", "forward", nbytes, n, f"stage {stage} gradient out", "p2p")
    if stage < last and owner(stage + 1) != owner(stage):
        st.add("send", "pp", "forward", nbytes, n, f"stage {stage} activation out", "p2p")
        st.add("recv", "pp", "forward", nbytes, n, f"stage {stage} gradient in", "p2p")


def fsdp_collectives(st: _Step, f: Fold, rank: int, params: tuple, n: int, weight: int,
                     partial: int) -> None:
    """FSDP2 per group: all-gathers, one reduce-scatter, tp all-reduces of partial sums.

    FSDP2 issues neither on a mesh of one rank (it copies the shard and keeps the
    gradient), so ``add``'s size-1 rule holds for it too.
    """
    pp1 = f.pp == 1
    sync = "backward" if pp1 else "forward"
    for name, expert, ranks, padded, partials in _fsdp_groups(f, rank, params[0], params[1]):
        mesh = "edp" if expert else "dp_cp"
        gathers = n if pp1 else 1
        st.add("all_gather", mesh, "forward", padded * weight, gathers, f"FSDP {name}",
               "step")
        if pp1:
            st.add("all_gather", mesh, "backward", padded * weight, gathers, f"FSDP {name}",
                   "step")
        for numel in partials:
            st.add("all_reduce", "tp", sync, numel * partial, 1, f"FSDP {name} tp sum", "step")
        st.add("reduce_scatter", mesh, sync, ranks * padded * FP32, 1, f"FSDP {name}", "step")


@lru_cache(maxsize=8192)
def _fsdp_groups(f: Fold, rank: int, cfg, layout: Layout) -> tuple:
    """(group, expert, ranks, padded shard elements, tp-partial parameter sizes) per FSDP
    group of the rank's parameters."""
    params = rank_params(cfg, layout, rank)
    groups: dict[str, list[ParamShard]] = defaultdict(list)
    for p in params:
        if p.expert and f.edp == 1:
            continue  # ignored by FSDP: one copy of each shard, nothing to gather
        groups[p.group].append(p)
    out = []
    for name, members in groups.items():
        expert = members[0].expert
        ranks, _ = fsdp_index(f, rank, expert)
        padded = sum(p.fsdp_shard(ranks, 0)[0] for p in members)
        out.append((name, expert, ranks, padded,
                    tuple(p.numel for p in members if p.tp_partial)))
    return tuple(out)


def replicate_collectives(st: _Step, f: Fold, params: Iterable[ParamShard]) -> None:
    """``foldmesh.reduce_gradients``: one flat fp32 all-reduce per group."""
    sizes: dict[str, int] = defaultdict(int)
    for p in params:
        group = "edp" if p.expert else "dp_cp_tp" if p.tp_partial else "dp_cp"
        sizes[group] += p.numel
    for group, numel in sorted(sizes.items()):
        st.add("all_reduce", group, "forward", numel * FP32, 1, f"gradients over {group}",
               "step")


def bytes_by(collectives: Iterable[Collective], fold: Fold) -> dict[tuple[str, str, str], float]:
    """Bytes per (kind, axis, direction), the keys of ``CollectiveCounter.bytes_by()``."""
    out: dict[tuple[str, str, str], float] = defaultdict(float)
    for c in collectives:
        out[(c.kind, axis_label(fold, c.group), c.direction)] += c.total
    return dict(out)


def counts_by(collectives: Iterable[Collective], fold: Fold) -> dict[tuple[str, str, str], int]:
    """Calls per (kind, axis, direction), the keys of ``CollectiveCounter.counts_by()``."""
    out: dict[tuple[str, str, str], int] = defaultdict(int)
    for c in collectives:
        out[(c.kind, axis_label(fold, c.group), c.direction)] += c.count
    return dict(out)


__all__ = ["Collective", "axis_label", "bytes_by", "counts_by", "group_size",
           "step_collectives"]
