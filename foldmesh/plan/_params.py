"""Which parameter shards a rank holds, and how data parallelism groups them.

The shapes come from the model itself: one ``Block`` of each kind (dense, MoE) is built on
the meta device and its parameters are sharded by the rules ``foldmesh.parallelize`` and
``foldmesh.moe.apply_moe_parallel`` apply (docs/placements.md):

==========================================  ===========================================
parameter                                   local shard (before FSDP)
==========================================  ===========================================
``embed``, ``lm_head`` [V, H]               [V/tp, H] (vocabulary over tp)
q/k/v projections, dense and shared-expert  output dim over tp (column-parallel)
gate/up
``o_proj``, dense and shared ``down_proj``  input dim over tp (row-parallel)
norms, q/k norms, shared-expert gate        replicated over tp (gradient a tp partial sum)
MLA ``q_b_proj``, ``kv_b_proj``             output dim over tp (column-parallel, heads)
MLA ``q_a_proj``, ``kv_a_proj``,            replicated over tp (sequence-parallel: gradient
``q_a_norm``                                a tp partial sum)
MLA ``kv_a_norm``                           plain tensor on the gathered latent (the same
                                            gradient on every tp rank: not a partial sum)
router gate [E, H]                          replicated (gradient all-reduced over tp)
experts ``w_gate``/``w_up`` [E, H, F]       [E/ep, H, F/etp]
experts ``w_down`` [E, F, H]                [E/ep, F/etp, H]
==========================================  ===========================================

FSDP2 (``foldmesh.apply_fsdp``) then shards every dense parameter over dp·cp on dim 0 and the
experts over edp (dim 0 when the local experts divide over edp, else dim 1), in one group
per block (experts in their own group when edp > 1) plus one root group (embedding, final
norm, output head); a rank keeps ``torch.chunk``'s piece of each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .._fold import Fold
from ..models import ModelConfig
from ..models.model import Block
from ..pipeline._schedules import schedule_style
from ..pipeline._split import split_layers, stage_indices
from ._workload import Layout, rank_coordinates

_COLWISE = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight",
            "v_proj.bias", "gate_proj.weight", "up_proj.weight",
            "q_b_proj.weight", "kv_b_proj.weight")  # MLA's up-projections split the heads
_ROWWISE = ("o_proj.weight", "down_proj.weight")


@dataclass(frozen=True)
class ParamShard:
    """One parameter as one rank holds it.

    Attributes:
        name: the whole model's parameter name (``layers.3.attn.q_proj.weight``).
        stage: the pipeline stage holding it.
        group: its FSDP group: ``"root"``, ``"block.<i>"`` or ``"experts.<i>"``.
        shape: the shard after tensor/expert parallelism, before FSDP.
        expert: a routed expert weight (summed over edp, not dp·cp).
        tp_partial: replicated over tp with tp > 1: its gradient is a tp partial sum.
        fsdp_dim: the dim FSDP2 shards it on.
    """

    name: str
    stage: int
    group: str
    shape: tuple[int, ...]
    expert: bool
    tp_partial: bool
    fsdp_dim: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def fsdp_shard(self, ranks: int, index: int) -> tuple[int, int]:
        """(padded, actual) elements of FSDP2's shard ``index`` of ``ranks``: every rank's
        communication buffer holds ceil(d/ranks) rows; the parameter itself is
        ``torch.chunk``'s piece (the last ones shorter or empty)."""
        d = self.shape[self.fsdp_dim]
        rest = self.numel // d if d else 0
        per = -(-d // ranks)
        mine = max(0, min(per, d - per * index))
        return per * rest, mine * rest


@lru_cache(maxsize=64)
def _block_params(cfg: ModelConfig, moe: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name inside the block, global shape) of a dense or an MoE block's parameters."""
    layer = next(i for i in range(cfg.num_layers) if cfg.is_moe(i) == moe)
    with torch.device("meta"):
        block = Block(cfg, layer)
    return tuple((n, tuple(p.shape)) for n, p in block.named_parameters())


def _shard(name: str, shape: tuple[int, ...], fold: Fold) -> tuple[tuple[int, ...], bool, bool]:
    """(local shape, expert, tp_partial) of a block parameter per the module table."""
    s = list(shape)
    if ".experts." in f".{name}":
        s[0] //= fold.ep
        s[2 if name.endswith(("w_gate", "w_up")) else 1] //= fold.etp
        return tuple(s), True, False
    if name.endswith(_COLWISE) and fold.tp > 1:
        s[0] //= fold.tp
        return tuple(s), False, False
    if name.endswith(_ROWWISE) and fold.tp > 1:
        s[1] //= fold.tp
        return tuple(s), False, False
    # the router's gradient is all-reduced in backward; MLA's kv_a_norm runs on the whole
    # gathered latent (foldmesh.parallelize._gather_kv_latent): complete on every tp rank
    whole = name.endswith(("router.weight", "kv_a_norm.weight"))
    return tuple(s), False, fold.tp > 1 and not whole


def stages_of(cfg: ModelConfig, layout: Layout, pp_rank: int) -> tuple[tuple[int, range], ...]:
    """(stage index, its global layer indices) of every stage pp rank ``pp_rank`` runs."""
    f = layout.fold
    if f.pp == 1:
        return ((0, range(cfg.num_layers)),)
    return _stages(cfg.num_layers, f.pp, layout.stages_per_rank,
                   schedule_style(layout.schedule), pp_rank, layout.pp_layers)


@lru_cache(maxsize=4096)
def _stages(num_layers: int, pp: int, v: int, style: str, pp_rank: int,
            pp_layers: tuple[int, ...] = ()) -> tuple:
    layers = split_layers(num_layers, pp * v, pp_layers or None)
    return tuple((s, layers[s]) for s in stage_indices(pp_rank, pp, v, style))


def rank_params(cfg: ModelConfig, layout: Layout, rank: int) -> tuple[ParamShard, ...]:
    """Every parameter shard global ``rank`` holds, in module order per stage."""
    f = layout.fold
    return _rank_params(cfg, f, layout.schedule if f.pp > 1 else "1F1B",
                        layout.stages_per_rank, rank_coordinates(f, rank)["pp"],
                        layout.pp_layers)


@lru_cache(maxsize=4096)
def _rank_params(cfg: ModelConfig, f: Fold, schedule: str, stages_per_rank: int,
                 pp_rank: int, pp_layers: tuple[int, ...] = ()) -> tuple[ParamShard, ...]:
    layout = Layout(f, schedule=schedule, stages_per_rank=stages_per_rank,
                    pp_layers=pp_layers)
    out: list[ParamShard] = []
    last = layout.num_stages - 1 if f.pp > 1 else 0
    v, h = cfg.vocab_size, cfg.hidden_size
    local_experts = cfg.num_experts // f.ep
    for stage, layers in stages_of(cfg, layout, pp_rank):
        if stage == 0:
            out.append(ParamShard("embed.weight", stage, "root", (v // f.tp, h), False, False))
        for i in layers:
            for name, shape in _block_params(cfg, cfg.is_moe(i)):
                local, expert, partial = _shard(name, shape, f)
                group = f"experts.{i}" if expert and f.edp > 1 else f"block.{i}"
                dim = 0
                if expert and local_experts % f.edp and local[1] % f.edp == 0:
                    dim = 1  # apply_fsdp's _expert_placement
                out.append(ParamShard(f"layers.{i}.{name}", stage, group, local, expert,
                                      partial, dim))
        if stage == last:
            out.append(ParamShard("norm.weight", stage, "root", (h,), False, f.tp > 1))
            if not cfg.tie_embeddings:
                out.append(ParamShard("lm_head.weight", stage, "root", (v // f.tp, h), False,
                                      False))
    return tuple(out)


@lru_cache(maxsize=65536)
def fsdp_index(fold: Fold, rank: int, expert: bool) -> tuple[int, int]:
    """(ranks, this rank's index) of the mesh FSDP2 shards a parameter over: edp for experts,
    dp·cp (cp fastest) for everything else."""
    c = rank_coordinates(fold, rank)
    if expert:
        return fold.edp, c["edp"]
    return fold.dp * fold.cp, c["dp"] * fold.cp + c["cp"]
