"""Dry runs: one rank of a large world on the fake backend and the meta device.

The expected shards and all-to-all volumes are derived here from the fold, independently of
the code under test: experts [E/ep, H, F/etp] sharded by FSDP over edp, and with padded
experts every rank sends each other ep rank C rows for each of that rank's E/ep experts,
C = ceil(n*k/E * capacity_factor) for the rank's n = b*S/(cp*tp) tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch.distributed as dist
from foldmesh.kernels import _experts, _ops
from torch.distributed.fsdp._fully_shard import _fsdp_param_group, _fully_shard

from foldmesh import Fold, FoldError
from foldmesh.models import preset
from foldmesh.plan import (
    Layout,
    Workload,
    bytes_by,
    counts_by,
    rank_coordinates,
    state_bytes,
    step_collectives,
)
from foldmesh.plan._dry_run import dry_run

# debug-mixtral: H 32, 4 query heads of 8, 2 kv heads, V 64, E 8 experts, top-2, F 16, 2 layers
MODEL = preset("debug-mixtral")
H, E, K, F = 32, 8, 2, 16
B, SEQ = 2, 32  # micro-batch and sequence length of the small runs


def run(fold: dict, rank: int = 0, world: int = 16, model=MODEL, seq: int = SEQ,
        global_batch: int = 64, dtype: str = "bf16", **layout):
    wl = Workload(model, global_batch=global_batch, seq_len=seq, compute_dtype=dtype)
    return dry_run(wl, Layout(Fold(**fold).resolve(world), micro_batch=layout.pop("b", B),
                              **layout), rank)


def a2a_rows(f: Fold, b: int = B, seq: int = SEQ, experts: int = E, topk: int = K,
             capacity_factor: float = 1.0) -> tuple[int, int]:
    """Rows one MoE layer's dispatch sends over ep, and over etp, from one rank."""
    n = b * seq // (f.cp * f.tp)
    c = math.ceil(n * topk / experts * capacity_factor)
    local = experts // f.ep
    ep_rows = (f.ep - 1) * local * c  # C rows per expert of every other ep rank
    # after the ep exchange the rank holds ep*El*C rows and sends them to every other etp rank
    etp_rows = (f.etp - 1) * f.ep * local * c
    return ep_rows, etp_rows


def shard(report, name: str) -> tuple[int, ...]:
    return {p.name: p.shape for p in report.params}[name]


FOLDS = {
    # 16 ranks: attention tp2 dp4 | MoE ep4 edp2, two stages
    "tp2-ep4-pp2": dict(tp=2, ep=4, pp=2),
    # 16 ranks: attention tp2 cp2 dp2 | MoE ep2 etp2 edp2, two stages
    "tp2-cp2-ep2-etp2-pp2": dict(tp=2, cp=2, ep=2, etp=2, pp=2),
}
# (w_gate, w_down, q_proj) local shapes: experts [E/ep, H, F/etp] then FSDP over edp (dim 0
# when E/ep divides by edp); q_proj [Hq*D/tp, H] then FSDP over dp*cp
SHARDS = {
    ("tp2-ep4-pp2", "fsdp"): ((1, H, F), (1, F, H), (4, H)),
    ("tp2-ep4-pp2", "replicate"): ((2, H, F), (2, F, H), (16, H)),
    ("tp2-cp2-ep2-etp2-pp2", "fsdp"): ((2, H, F // 2), (2, F // 2, H), (4, H)),
    ("tp2-cp2-ep2-etp2-pp2", "replicate"): ((4, H, F // 2), (4, F // 2, H), (16, H)),
}


@pytest.mark.parametrize("mode", ["fsdp", "replicate"])
@pytest.mark.parametrize("name", list(FOLDS))
@pytest.mark.parametrize("rank", [0, 15])
def test_small_fold(name, mode, rank):
    r = run(FOLDS[name], rank=rank, data_parallel=mode)
    f = r.fold
    assert r.coordinates == rank_coordinates(f, rank)
    stage = r.coordinates["pp"]
    assert r.stages == (stage,)
    layer = f"layers.{stage}"  # one layer per stage

    gate, down, q = SHARDS[(name, mode)]
    assert shard(r, f"{layer}.ffn.experts.w_gate") == gate
    assert shard(r, f"{layer}.ffn.experts.w_up") == gate
    assert shard(r, f"{layer}.ffn.experts.w_down") == down
    assert shard(r, f"{layer}.attn.q_proj.weight") == q
    names = {p.name for p in r.params}
    assert ("embed.weight" in names) == (stage == 0)
    assert ("lm_head.weight" in names) == (stage == 1)
    assert r.param_bytes == sum(p.bytes for p in r.params)
    assert r.grad_bytes == r.param_bytes  # fp32 gradients of every weight, sharded alike

    # The MoE tokens cross EP links in bf16 under FSDP mixed precision, and under
    # replication's autocast too: the residual stream stays fp32, the routed tokens do not.
    act = 2
    ep_rows, etp_rows = a2a_rows(f)
    for direction in ("forward", "backward"):
        assert r.counts[("all_to_all", "ep", direction)] == 2
        assert r.collectives[("all_to_all", "ep", direction)] == 2 * ep_rows * H * act
        if f.etp > 1:
            assert r.counts[("all_to_all", "etp", direction)] == 2
            assert r.collectives[("all_to_all", "etp", direction)] == 2 * etp_rows * H * act
    assert r.capacity == math.ceil(B * SEQ // (f.cp * f.tp) * K / E)
    # the router's logits keep its own precision (fp32) under autocast too: the softmax
    # over the E experts saves them once
    n = B * SEQ // (f.cp * f.tp)
    assert [g.dtype for g in r.saved_breakdown
            if g.op == "SoftmaxBackward0" and g.shape == (n, E)] == ["float32"]

    dense = "dp_cp" if f.cp > 1 else "dp"
    if mode == "fsdp":
        assert r.counts[("all_gather", dense, "forward")] == 2  # the block and the root
        assert r.counts[("all_gather", "edp", "forward")] == 1
        # under a pipeline schedule FSDP reduces after the backwards, outside autograd
        assert r.counts[("reduce_scatter", "edp", "forward")] == 1
        assert r.counts[("reduce_scatter", dense, "forward")] == 2
        assert ("all_reduce", dense, "forward") not in r.counts
    else:
        assert r.counts[("all_reduce", dense, "forward")] == 1  # one bucket per group
        assert r.counts[("all_reduce", "edp", "forward")] == 1
        assert not any(k[0] == "all_gather" and k[1] in (dense, "edp") for k in r.counts)
    if f.cp > 1:  # K and V gathered over cp, their gradients reduce-scattered
        assert r.counts[("all_gather", "cp", "forward")] == 2
        assert r.counts[("reduce_scatter", "cp", "backward")] == 2
    assert r.collectives[("all_reduce", "world", "forward")] == 8  # the fp64 gradient norm

    assert r.saved_activation_bytes == sum(r.saved_by_stage) > 0
    assert sum(g.bytes * g.count for g in r.saved_breakdown) == r.saved_activation_bytes
    assert 0 < r.peak_bytes
    out = json.loads(json.dumps(r.to_dict()))
    assert out["collectives"]["all_to_all/ep/forward"] == r.collectives[
        ("all_to_all", "ep", "forward")]
    assert out["fold"]["edp"] == f.edp and out["params"][0]["name"] == r.params[0].name
    assert r.workload.pad_to_capacity and r.workload.model.capacity_factor == 1.0


def test_capacity_factor_sets_the_padded_rows():
    model = preset("debug-mixtral", capacity_factor=1.25)
    r = run(FOLDS["tp2-ep4-pp2"], model=model)
    ep_rows, _ = a2a_rows(r.fold, capacity_factor=1.25)
    assert r.capacity == math.ceil(B * SEQ // 2 * K / E * 1.25) == 10
    assert r.collectives[("all_to_all", "ep", "forward")] == 2 * ep_rows * H * 2
    assert not any("capacity_factor" in n for n in r.notes)


def test_activation_checkpointing_recomputes_the_dispatch():
    fold = dict(tp=2, cp=2, ep=2, etp=2)  # no pp: the whole model, two checkpointed blocks
    plain = run(fold)
    ac = run(fold, activation_checkpoint="full")
    assert ac.saved_activation_bytes < plain.saved_activation_bytes
    for r, per_layer in ((plain, 2), (ac, 4)):  # backward: its own two, then the replay's
        assert r.counts[("all_to_all", "ep", "forward")] == 2 * 2
        assert r.counts[("all_to_all", "ep", "backward")] == 2 * per_layer
    assert ac.params == plain.params  # the checkpoint wrapper leaves global names alone
    # without pp FSDP reshards after forward: experts gathered again and reduced in backward
    assert plain.counts[("all_gather", "edp", "backward")] == 2
    assert plain.counts[("reduce_scatter", "edp", "backward")] == 2


def test_allgather_dispatcher_runs_dropless():
    model = preset("debug-mixtral", capacity_factor=1.0)
    wl = Workload(model, global_batch=64, seq_len=SEQ, dispatcher="allgather")
    r = dry_run(wl, Layout(Fold(**FOLDS["tp2-ep4-pp2"]).resolve(16), micro_batch=B), 0)
    assert r.capacity is None
    assert not any(k[0] == "all_to_all" for k in r.counts)
    # tokens, probabilities and expert ids gathered over ep (etp = 1), outputs scattered back
    assert r.counts[("all_gather", "ep", "forward")] == 3
    assert r.counts[("reduce_scatter", "ep", "forward")] == 1
    n = B * SEQ // 2
    assert r.collectives[("reduce_scatter", "ep", "forward")] == 4 * n * H * 2
    assert any("dropless" in note for note in r.notes)


def test_the_process_is_left_as_it_was():
    before = (_ops.grouped_gemm_ref, _ops.unpermute_ref, _experts.swiglu_ref,
              _fully_shard._get_device_from_mesh,
              _fsdp_param_group.FSDPParamGroup._validate_no_meta_params, dict(os.environ))
    run(FOLDS["tp2-ep4-pp2"])
    after = (_ops.grouped_gemm_ref, _ops.unpermute_ref, _experts.swiglu_ref,
             _fully_shard._get_device_from_mesh,
             _fsdp_param_group.FSDPParamGroup._validate_no_meta_params, dict(os.environ))
    assert before == after
    assert not dist.is_initialized()


def test_interleaved_stages_of_one_rank():
    # demo: 4 layers, 4 stages of one layer on 2 pp ranks; rank 15 is pp rank 1
    r = run(dict(tp=2, ep=4, pp=2), rank=15, model=preset("demo"), global_batch=64, b=2,
            schedule="Interleaved1F1B", stages_per_rank=2)
    assert r.stages == (1, 3)
    assert len(r.saved_by_stage) == 2
    assert {p.name.split(".")[0] for p in r.params} == {"layers", "norm", "lm_head"}
    assert r.counts[("all_to_all", "ep", "forward")] == 2 * 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=16), "rank 16"),
    (dict(b=3), "micro_batch"),
    (dict(seq=30, fold=dict(tp=2, cp=2, ep=4)), "seq_len"),
    (dict(global_batch=6, b=2), "global batch"),  # 6 rows over dp 4: not whole
    (dict(fold=dict(tp=2, ep=16, pp=1)), "ep = 16"),
    (dict(fold=dict(tp=4, ep=4)), "num_kv_heads"),
    (dict(fold=dict(pp=4, ep=4)), "pipeline stages"),
    (dict(schedule="Nope"), "pp_schedule"),
])
def test_bad_requests_name_the_setting(kwargs, match):
    kwargs.setdefault("fold", FOLDS["tp2-ep4-pp2"])
    with pytest.raises(FoldError, match=match):
        run(kwargs.pop("fold"), **kwargs)
    assert not dist.is_initialized()  # the fake world is gone: the next dry run can start


def test_in_a_process_with_a_process_group_it_runs_in_a_subprocess():
    here = run(FOLDS["tp2-cp2-ep2-etp2-pp2"], rank=5)
    dist.init_process_group("fake", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="isolate=True"):
            dry_run(Workload(MODEL, global_batch=64, seq_len=SEQ),
                    Layout(Fold(**FOLDS["tp2-cp2-ep2-etp2-pp2"]).resolve(16), micro_batch=B),
                    5, isolate=False)
        there = dry_run(Workload(MODEL, global_batch=64, seq_len=SEQ),
                        Layout(Fold(**FOLDS["tp2-cp2-ep2-etp2-pp2"]).resolve(16),
                               micro_batch=B), 5, timeout=300)
    finally:
        dist.destroy_process_group()
    assert there.collectives == here.collectives and there.params == here.params
    assert there.saved_activation_bytes == here.saved_activation_bytes


# Mixtral-8x22B on 1,024 ranks: attention tp2 dp64 | MoE ep8 edp16, 8 stages of 7 layers
# (the last holds 6 and the head). Its wall time is measured by scripts/bench_plan.py.
MIXTRAL = dict(tp=2, ep=8, pp=8, etp=1)


@pytest.mark.parametrize("rank, stage, layers", [(0, 0, 7), (1023, 7, 6)])
def test_mixtral_8x22b_on_1024_ranks(rank, stage, layers):
    model = preset("mixtral-8x22b")
    r = run(MIXTRAL, rank=rank, world=1024, model=model, seq=4096, global_batch=1024, b=1)
    assert r.fold.dp == 64 and r.fold.edp == 16
    assert r.stages == (stage,)
    moe = sorted({p.name.split(".")[1] for p in r.params if ".experts." in p.name}, key=int)
    assert len(moe) == layers
    # one expert per ep rank, H = 6144 sharded over edp = 16 (one expert cannot be)
    assert shard(r, f"layers.{moe[0]}.ffn.experts.w_gate") == (1, 6144 // 16, 16384)
    assert shard(r, f"layers.{moe[0]}.ffn.experts.w_down") == (1, 16384 // 16, 6144)
    expert_bytes = sum(p.bytes for p in r.params if ".experts." in p.name)
    assert expert_bytes == layers * 3 * 6144 * 16384 * 4 // 16
    ep_rows, _ = a2a_rows(r.fold, b=1, seq=4096, experts=8, topk=2)
    assert r.capacity == 512
    for direction in ("forward", "backward"):
        assert r.collectives[("all_to_all", "ep", direction)] == 2 * layers * ep_rows * 6144 * 2
    # FSDP over edp: the experts' bf16 shards gathered, their fp32 gradients reduce-scattered
    assert r.collectives[("all_gather", "edp", "forward")] == expert_bytes // 2
    assert r.collectives[("reduce_scatter", "edp", "forward")] == 16 * expert_bytes
    # acceptance: the counted bytes equal the analytic planner's for this rank
    planned = step_collectives(r.workload, r.layout, rank, microbatches=1, trainer=False,
                               p2p=False)
    assert bytes_by(planned, r.fold) == r.collectives
    assert counts_by(planned, r.fold) == r.counts
    assert r.param_bytes == state_bytes(r.workload, r.layout, rank)[0]


@pytest.mark.parametrize("name", list(FOLDS))
@pytest.mark.parametrize("mode", ["fsdp", "replicate"])
def test_counted_bytes_equal_the_planners(name, mode):
    for rank in (0, 15):
        r = run(FOLDS[name], rank=rank, data_parallel=mode)
        planned = step_collectives(r.workload, r.layout, rank, microbatches=1, trainer=False,
                                   p2p=False)
        assert bytes_by(planned, r.fold) == r.collectives, (name, mode, rank)
        assert r.param_bytes == state_bytes(r.workload, r.layout, rank)[0]


def test_an_explicit_pipeline_split():
    """``pp_layers`` (the trainer's ``fold.pp_layers``) moves layers between stages: the
    dry run builds that split, and its bytes still equal the planner's for the rank."""
    model = dataclasses.replace(MODEL, num_layers=3)  # the default split is 2 + 1
    for rank, layers in ((0, {"layers.0"}), (15, {"layers.1", "layers.2"})):
        r = run(FOLDS["tp2-ep4-pp2"], rank=rank, model=model, pp_layers=(1, 2))
        assert {p.name.split(".ffn")[0] for p in r.params if ".ffn." in p.name} == layers
        planned = step_collectives(r.workload, r.layout, rank, microbatches=1, trainer=False,
                                   p2p=False)
        assert bytes_by(planned, r.fold) == r.collectives
        assert r.param_bytes == state_bytes(r.workload, r.layout, rank)[0]


@pytest.mark.parametrize("mode, ac", [("fsdp", "full"), ("replicate", "none")])
def test_multi_head_latent_attention(mode, ac):
    """A DeepSeek-style model (MLA without a query latent, as DeepSeek-V2-Lite; cp = 1, MLA
    under cp is refused): the latents are gathered over tp, v heads (6) smaller than q/k's
    (12) run as the memory-efficient kernel on meta, and the counted bytes, calls and
    weights equal the planner's on both stages."""
    model = preset("debug-deepseek", q_lora_rank=None)
    for rank in (0, 15):
        r = run(dict(tp=2, ep=4, pp=2), rank=rank, model=model, data_parallel=mode,
                activation_checkpoint=ac)
        # kv_b_proj [Hq·(Dn + Dv), Rkv] = [56, 12]: heads over tp, then FSDP over dp = 4
        kv_b = next(p.shape for p in r.params if p.name.endswith("attn.kv_b_proj.weight"))
        assert kv_b == ((7, 12) if mode == "fsdp" else (28, 12))
        planned = step_collectives(r.workload, r.layout, rank, microbatches=1, trainer=False,
                                   p2p=False)
        assert bytes_by(planned, r.fold) == r.collectives, (mode, rank)
        assert counts_by(planned, r.fold) == r.counts, (mode, rank)
        assert r.param_bytes == state_bytes(r.workload, r.layout, rank)[0]
        assert r.counts[("all_reduce", "tp", "backward")] >= 1  # c's gradient
