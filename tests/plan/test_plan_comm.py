"""The planner's collectives and state memory against a real trainer step on 8 gloo ranks.

Every rank builds the real ``Trainer`` (``foldmesh.train``) for a drawn fold, runs one step
(a pipeline's first step also runs torch's P2P warm-up), then runs a second step under
``CollectiveCounter``. The planner (``foldmesh.plan.step_collectives``), given only the
trainer's config, must predict every rank's bytes and call counts per (kind, axis,
direction) exactly; and its weight, gradient and AdamW-state bytes (``state_bytes``) must
equal the rank's tensors exactly. Routing is static (``pad_to_capacity``): with it the
all-to-all sizes are known without the routing decisions.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import DTensor

from foldmesh import Fold
from foldmesh.plan import bytes_by, counts_by, from_train_config, state_bytes, step_collectives
from foldmesh.testing import CollectiveCounter, RankPool, folds
from foldmesh.train import load_config, validate_config

WORLD = 8
# The demo preset shrunk: every size divides tp <= 4 and ep, etp <= 8; a step takes ~1-3 s.
SMALL = ["--preset", "demo",
         "--model.overrides.hidden_size", "64", "--model.overrides.expert_ffn_size", "64",
         "--model.overrides.capacity_factor", "1.0",
         "--model.overrides.pad_to_capacity", "true",
         "--data.seq_len", "32", "--data.max_bytes", "200000", "--training.global_batch", "8",
         "--training.device", "cpu", "--training.dtype", "fp32", "--training.val_every", "0",
         "--checkpoint.every", "0", "--checkpoint.resume", "false",
         "--metrics.progress", "false", "--metrics.plots", "false"]
# Qwen2-MoE's features on the same sizes: a dense first layer, a gated shared expert
QWEN = ["--model.overrides.first_k_dense", "1", "--model.overrides.ffn_size", "64",
        "--model.overrides.shared_ffn_size", "64", "--model.overrides.shared_gate", "true",
        "--model.overrides.qkv_bias", "true"]

# DeepSeek-V3's attention (Multi-head Latent Attention, low-rank query) and routing (sigmoid
# scores in expert groups, the aux-loss-free bias) on the same sizes; cp stays 1 (MLA under
# cp is refused)
DEEPSEEK = ["--model.preset", "debug-deepseek", "--model.overrides.vocab_size", "256"]
# DeepSeek-V2-Lite's plain query (x gathered for q_proj; TOML has no None to drop
# debug-deepseek's q_lora_rank), shrunk to the same sizes
V2_LITE = ["--model.preset", "deepseek-v2-lite", "--model.overrides.vocab_size", "256",
           *(f"--model.overrides.{k}={v}" for k, v in (
               ("num_heads", 4), ("num_kv_heads", 4), ("ffn_size", 48), ("num_experts", 8),
               ("topk", 2), ("shared_ffn_size", 16), ("kv_lora_rank", 12),
               ("qk_nope_head_dim", 8), ("qk_rope_head_dim", 4), ("v_head_dim", 6)))]


@pytest.fixture(scope="module")
def pool():
    with RankPool(WORLD, timeout=180) as p:
        yield p


def make_config(fold: Fold, data_parallel: str, run_dir, *, ac="none", micro=0, layers=2,
                schedule="1F1B", stages=0, extra=()):
    cfg = load_config([*SMALL, *extra, "--model.overrides.num_layers", str(layers),
                       "--training.micro_batch", str(micro),
                       "--fold.tp", str(fold.tp), "--fold.cp", str(fold.cp),
                       "--fold.ep", str(fold.ep), "--fold.etp", str(fold.etp),
                       "--fold.pp", str(fold.pp), "--fold.data_parallel", data_parallel,
                       "--fold.activation_checkpoint", ac, "--fold.pp_schedule", schedule,
                       "--fold.pp_stages_per_rank", str(stages),
                       "--checkpoint.dir", str(run_dir)])
    validate_config(cfg, WORLD)
    return cfg


def _local_bytes(t) -> int:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def measure(cfg) -> dict:
    """On every rank: a warm-up step, a counted step, then the rank's state tensors."""
    from foldmesh import reduce_gradients
    from foldmesh.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        first = trainer.train_step()
        counter = CollectiveCounter(trainer.fm)
        with counter:
            trainer.train_step()
        # gradients of a third step's forward/backward, reduced as the step reduces them
        trainer._forward_backward()
        if cfg.fold.data_parallel != "fsdp":
            reduce_gradients(trainer.parts, trainer.fm)
        params = [p for part in trainer.parts for p in part.parameters()]
        out = dict(
            bytes=counter.bytes_by(), counts=counter.counts_by(),
            weights=sum(_local_bytes(p) for p in params),
            gradients=sum(_local_bytes(p.grad) for p in params if p.grad is not None),
            optimizer=sum(_local_bytes(v) for opt in trainer.optimizers
                          for state in opt.state.values() for v in state.values()),
            params_without_grad=sum(p.grad is None for p in params), loss=first["loss"])
    finally:
        trainer.log.close()
    trainer.fm.destroy()
    return out


def check(pool, cfg) -> list[dict]:
    """Every rank's measurement equals the planner's prediction; returns the measurements."""
    results = pool.run(measure, cfg)
    workload, layout = from_train_config(cfg, WORLD, "cpu")
    for rank, got in enumerate(results):
        predicted = step_collectives(workload, layout, rank)
        want_bytes = bytes_by(predicted, layout.fold)
        want_counts = counts_by(predicted, layout.fold)
        keys = sorted(set(got["bytes"]) | set(want_bytes))
        wrong = [(k, got["bytes"].get(k), want_bytes.get(k), got["counts"].get(k),
                  want_counts.get(k)) for k in keys
                 if got["bytes"].get(k) != want_bytes.get(k)
                 or got["counts"].get(k) != want_counts.get(k)]
        assert not wrong, (f"{layout} rank {rank}: (key, measured bytes, predicted bytes, "
                           f"measured calls, predicted calls):\n" +
                           "\n".join(map(str, wrong)))
        assert got["params_without_grad"] == 0
        weights, gradients, optimizer = state_bytes(workload, layout, rank)
        assert (got["weights"], got["gradients"], got["optimizer"]) == (
            weights, gradients, optimizer), (layout, rank)
    return results


@settings(max_examples=6, deadline=None, database=None)
@given(fold=folds(WORLD, pp=(1, 2), max_tp=4),
       data_parallel=st.sampled_from(["fsdp", "replicate"]),
       ac=st.sampled_from(["none", "full"]), two_micro=st.booleans())
def test_predicted_bytes_equal_counted(pool, tmp_path_factory, fold, data_parallel, ac,
                                       two_micro):
    rows = 8 // fold.dp
    micro = 1 if fold.pp > 1 else (rows // 2 if two_micro and rows > 1 else 0)
    cfg = make_config(fold, data_parallel, tmp_path_factory.mktemp("run"), ac=ac, micro=micro)
    check(pool, cfg)


PINNED = [
    # ep spanning cp and dp ranks, etp != tp, both dp modes
    (Fold(tp=2, cp=2, ep=4, etp=2), "replicate", dict(ac="full")),
    (Fold(tp=1, cp=4, ep=2, etp=2), "fsdp", {}),
    # dense FSDP over cp alone (dp = 1) while the experts shard over edp = 4
    (Fold(tp=2, cp=4, ep=2), "fsdp", {}),
    # dense FSDP over one rank (dp·cp = 1): FSDP2 issues nothing there, while the experts
    # still shard over edp = 4 (a CI draw the planner once got wrong)
    (Fold(pp=2, tp=4, ep=1), "fsdp", dict(micro=1)),
    # a dense layer and a gated shared expert, tensor-parallel
    (Fold(tp=2, ep=4, etp=2), "fsdp", dict(extra=QWEN, layers=3)),
    (Fold(pp=2, tp=2, ep=2), "replicate", dict(extra=QWEN, layers=3, micro=1)),
    # an explicit split (fold.pp_layers) against the default 2 + 1
    (Fold(pp=2, tp=2, ep=4), "fsdp", dict(layers=3, micro=1,
                                          extra=["--fold.pp_layers", "[1, 2]"])),
    # interleaved stages: 4 stages on 2 pp ranks, each rank's two stages apart
    (Fold(pp=2, tp=2, ep=4), "fsdp", dict(layers=4, micro=1, schedule="Interleaved1F1B",
                                          stages=2)),
]


@pytest.mark.parametrize("fold,data_parallel,kw", PINNED, ids=lambda v: repr(v)[:40])
def test_pinned_folds(pool, tmp_path, fold, data_parallel, kw):
    check(pool, make_config(fold, data_parallel, tmp_path, **kw))


MLA = [
    # the latents gathered over tp, etp = tp; a dense first layer then an MoE one
    (Fold(tp=2, ep=4, etp=2), "fsdp", dict(extra=DEEPSEEK)),
    # replication in bf16 (autocast: the query latent and c's gradient stay fp32, kv_a_proj's
    # output is bf16), with the recomputed forward's gathers
    (Fold(tp=2, ep=2), "replicate", dict(ac="full", extra=[*DEEPSEEK, "--training.dtype",
                                                           "bf16"])),
    # no q_lora_rank (x gathered for q_proj, as DeepSeek-V2-Lite), two stages, the replay
    (Fold(pp=2, tp=2, ep=4), "fsdp", dict(ac="full", extra=V2_LITE, micro=1)),
    # context parallel: the latent and the RoPE key all-gathered over cp, not K and V
    (Fold(cp=2, tp=2, ep=2, etp=2), "fsdp", dict(extra=DEEPSEEK)),
]


@pytest.mark.parametrize("fold,data_parallel,kw", MLA, ids=lambda v: repr(v)[:40])
def test_multi_head_latent_attention(pool, tmp_path, fold, data_parallel, kw):
    q_lora = "debug-deepseek" in kw["extra"]
    cfg = make_config(fold, data_parallel, tmp_path, **kw)
    results = check(pool, cfg)
    workload, layout = from_train_config(cfg, WORLD, "cpu")
    assert workload.model.is_mla and (workload.model.q_lora_rank is None) == (not q_lora)
    # the latents, not x, cross tp in forward on every rank that runs attention
    assert all(r["counts"][("all_reduce", "tp", "backward")] > 0 for r in results)


@pytest.mark.parametrize("data_parallel", ["fsdp", "replicate"])
def test_bf16_halves_the_dispatch_bytes(pool, tmp_path, data_parallel):
    """bf16 compute, as FSDP2's param_dtype or as replication's autocast, moves the MoE
    tokens in bf16: the dispatch's all-to-alls over ep and etp carry exactly half of fp32's
    bytes, the planner predicts both exactly, and the first step's loss stays within bf16
    tolerance of fp32's."""
    fold = Fold(tp=2, ep=2, etp=2)
    runs = {dtype: check(pool, make_config(fold, data_parallel, tmp_path / dtype,
                                           extra=["--training.dtype", dtype]))
            for dtype in ("fp32", "bf16")}
    for fp32, bf16 in zip(runs["fp32"], runs["bf16"], strict=True):
        dispatch = [k for k in fp32["bytes"] if k[0] == "all_to_all"]
        assert {k[1] for k in dispatch} == {"ep", "etp"}, dispatch
        for key in dispatch:
            assert 2 * bf16["bytes"][key] == fp32["bytes"][key], key
        assert bf16["loss"] == pytest.approx(fp32["loss"], rel=1e-2)


def test_dispatch_volume_is_figure_2s_minimum():
    """The all-to-all bytes of a balanced layer are the analytic minimum: each token copy
    leaves its rank once when its expert lives on another ep rank, (ep-1)/ep of T·k copies,
    and reaches each of the etp ranks of that expert once (docs/planner.md)."""
    from foldmesh.models import preset
    from foldmesh.plan import Layout, Workload

    cfg = preset("mixtral-8x22b")
    work = Workload(cfg, global_batch=256, seq_len=4096)
    for fold in (Fold(tp=2, ep=8, pp=8), Fold(tp=2, ep=4, etp=2, pp=8),
                 Fold(tp=4, cp=2, ep=8, etp=2, pp=2)):
        layout = Layout(fold.resolve(128))
        f, n = layout.fold, layout.microbatches(work)
        layers = 7  # the first stage's layers (56 + 2 over 8 stages, less the embedding)
        if f.pp == 2:
            layers = 28
        forward = [c for c in step_collectives(work, layout, 0)
                   if c.kind == "all_to_all" and c.direction == "forward"]
        copies = 4096 // (f.cp * f.tp) * cfg.topk  # T·k rows of one micro-batch
        per_layer = {g: sum(c.total for c in forward if c.group == g) / (n * layers)
                     for g in ("ep", "etp")}
        # dispatch + combine, bf16 rows of H = 6144
        assert per_layer["ep"] == pytest.approx(2 * copies * (f.ep - 1) / f.ep * 6144 * 2)
        assert per_layer["etp"] == pytest.approx(2 * (f.etp - 1) * copies * 6144 * 2)
        # with pad_to_capacity at capacity factor 1, exactly the same rows cross
        padded = Workload(replace(cfg, capacity_factor=1.0, pad_to_capacity=True), 256, 4096,
                          pad_to_capacity=True)
        assert [c.total for c in step_collectives(padded, layout, 0)
                if c.kind == "all_to_all"] == [c.total for c in step_collectives(
                    work, layout, 0) if c.kind == "all_to_all"]
