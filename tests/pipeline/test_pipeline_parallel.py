"""A pipeline-parallel model equals the single-process model: loss, every gradient, the norm.

8 gloo ranks, pp = 2: hypothesis draws the fold of each stage's 4 ranks (tp, cp, dp with etp,
ep, edp, including etp != tp and ep spanning cp), the schedule (every one the installed torch
ships), 1 or 2 stages per rank, the number of layers and an uneven split (including a stage
that holds only dense layers), micro-batches, FSDP2 or replication, dropless, with and without
the balancing losses. float64 throughout. The reference is the plain model on one process,
run micro-batch by micro-batch (each micro-batch of each replica is one token set of the
balancing losses, as in training with accumulation).
"""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foldmesh import (
    Fold,
    FoldError,
    apply_fsdp,
    clip_grad_norm_,
    grad_norm,
    parallelize,
    reduce_gradients,
)
from foldmesh.models import Transformer, preset
from foldmesh.moe import Router
from foldmesh.pipeline import SCHEDULES, apply_pipeline, check_pipeline, split_model
from foldmesh.testing import (
    RankPool,
    assert_close_to_reference,
    folded_mesh,
    folds,
    load_reference,
)

WORLD = 8
DTYPE = torch.float64
TOL = dict(rtol=1e-6, atol=1e-8)
MODELS = {  # untied (pp refuses tied embeddings); qwen2's first layer is dense
    "mixtral": preset("debug-mixtral", init_std=0.3, router_dtype="fp64"),
    "qwen2": preset("debug-qwen2", init_std=0.3, router_dtype="fp64"),
    "qwen3": preset("debug-qwen3", init_std=0.3, router_dtype="fp64", tie_embeddings=False),
}


@pytest.fixture(scope="module")
def pool():
    with RankPool(WORLD, timeout=180) as p:
        yield p


def clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def reference(cfg, seed, ids, labels, chunks):
    """The plain model's mean loss over ``chunks`` equal micro-batches of the global batch
    (in order: replica 0's micro-batches, then replica 1's...), and its gradients."""
    torch.manual_seed(seed)
    ref = Transformer(cfg, dtype=DTYPE)
    ref.init_weights()
    for m in ref.modules():
        if isinstance(m, Router):
            m.loss_scale = 1.0 / chunks
    total = torch.zeros((), dtype=DTYPE)
    for x, y in zip(ids.chunk(chunks), labels.chunk(chunks), strict=True):
        loss = F.cross_entropy(ref(x).reshape(-1, cfg.vocab_size), y.reshape(-1)) / chunks
        loss.backward()
        total += loss.detach()
    return ref, total


def check_pipeline_model(fold, name, num_layers, split, schedule, spr, n, m, seq, seed,
                         dp_mode, aux, ac="none"):
    fm = folded_mesh(fold)
    f = fm.fold
    cfg = replace(MODELS[name], num_layers=num_layers)
    if aux:
        cfg = replace(cfg, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    B, S = n * m * f.dp, seq * 2 * f.cp * f.tp
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    ref, ref_loss = reference(cfg, seed, ids, labels, n * f.dp)

    with torch.device("meta"):
        model = Transformer(cfg, dtype=DTYPE)
    parts = split_model(model, fm, schedule=schedule, stages_per_rank=spr,
                        layers_per_stage=split)
    calls = []

    def counter(i):
        def hook(mod, args, out):
            calls[i] += 1
        return hook

    for part in parts:
        parallelize(part, fm, activation_checkpoint=ac)
        part.to_empty(device="cpu")
        load_reference(part, ref)
        for r in (x for x in part.modules() if isinstance(x, Router)):
            calls.append(0)
            r.register_forward_hook(counter(len(calls) - 1))
        if dp_mode == "fsdp":
            apply_fsdp(part, fm, reshard_after_forward=False)
    pipe = apply_pipeline(parts, fm, schedule=schedule, microbatches=n, microbatch_size=m,
                          seq_len=S, dtype=DTYPE)
    rows = slice(fm.coordinate("dp") * n * m, (fm.coordinate("dp") + 1) * n * m)
    loss = pipe.step(ids[rows], labels[rows])
    # no shape-inference pass: every router saw exactly the n micro-batches
    if ac == "none":
        assert calls == [n] * len(calls), f"router forwards {calls}, expected {n} each"
    mean = loss.clone()
    dist.all_reduce(mean, group=fm["dp_cp"].get_group())
    assert_close_to_reference(mean / (f.dp * f.cp), ref_loss, name="loss", **TOL)
    if dp_mode == "replicate":
        reduce_gradients(parts, fm)
    refs = dict(ref.named_parameters())
    seen = []
    for part in parts:
        for pname, p in part.named_parameters():
            assert p.grad is not None, f"{pname} got no gradient"
            assert_close_to_reference(p.grad, refs[clean(pname)].grad,
                                      name=f"grad of {pname} (stage {part.pipeline_stage})",
                                      **TOL)
            seen.append(clean(pname))
    everywhere = [None] * WORLD
    dist.all_gather_object(everywhere, seen)
    union = [x for s in everywhere for x in s]
    assert set(union) == set(refs), f"parameters missing: {set(refs) - set(union)}"

    want = torch.sqrt(sum(r.grad.double().pow(2).sum() for r in refs.values()))
    assert_close_to_reference(grad_norm(parts, fm), want, name="grad norm", **TOL)
    clip_grad_norm_(parts, fm, max_norm=0.25 * want.item())
    assert_close_to_reference(grad_norm(parts, fm), 0.25 * want, name="clipped norm",
                              rtol=1e-5)
    for part in parts:  # validation, as the trainer runs it after the step
        part.eval()
    val = pipe.eval(ids[rows], labels[rows])  # forward only: no balancing losses, no counts
    for part in parts:
        part.train()
    dist.all_reduce(val, group=fm["dp_cp"].get_group())
    assert_close_to_reference(val / (f.dp * f.cp), ref_loss, name="eval loss", **TOL)
    if ac == "none":
        assert calls == [2 * n] * len(calls), f"router forwards {calls}, expected {2 * n}"


@st.composite
def pipelines(draw):
    """A schedule, stages per rank, layers, an optional uneven split and micro-batches."""
    schedule = draw(st.sampled_from(sorted(SCHEDULES)))
    info = SCHEDULES[schedule]
    spr = 2 if info.style == "v" else (draw(st.sampled_from([1, 2])) if info.multi else 1)
    stages = 2 * spr
    num_layers = draw(st.integers(stages, stages + 2))
    split = None
    if draw(st.booleans()):  # an explicit, uneven split: cut points drawn at random
        cuts = sorted(draw(st.sets(st.integers(1, num_layers - 1), min_size=stages - 1,
                                   max_size=stages - 1)))
        bounds = [0, *cuts, num_layers]
        split = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    n = draw(st.sampled_from([k for k in range(1, 7)
                              if _fits(schedule, spr, k)]))
    return schedule, spr, num_layers, split, n


def _fits(schedule, spr, n):
    try:
        check_pipeline(schedule, 2, spr, n)
    except FoldError:
        return False
    return True


@settings(max_examples=7, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fold=folds(WORLD, pp=(2,), max_tp=2), name=st.sampled_from(sorted(MODELS)),
       pipe=pipelines(), m=st.integers(1, 2), seq=st.integers(1, 2),
       seed=st.integers(0, 2**16), dp_mode=st.sampled_from(["fsdp", "replicate"]),
       aux=st.booleans())
def test_pipeline_equals_single_process(pool, fold, name, pipe, m, seq, seed, dp_mode, aux):
    schedule, spr, num_layers, split, n = pipe
    pool.run(check_pipeline_model, fold, name, num_layers, split, schedule, spr, n, m, seq,
             seed, dp_mode, aux)


@pytest.mark.parametrize("fold,name,split,schedule,spr,n,dp_mode,ac", [
    # stage 0 holds only qwen2's dense layer: its ranks never enter an MoE collective
    (Fold(pp=2, tp=2, cp=1, ep=4, etp=1), "qwen2", [1, 3], "1F1B", 1, 2, "fsdp", "none"),
    # ep spans cp and dp, etp != tp, edp = 2 != dp·cp = 4 under FSDP, interleaved stages
    (Fold(pp=2, tp=1, cp=2, ep=2, etp=1), "mixtral", None, "Interleaved1F1B", 2, 4, "fsdp",
     "none"),
    # a V schedule with activation checkpointing and replication
    (Fold(pp=2, tp=2, cp=1, ep=2, etp=2), "qwen3", [2, 1, 1, 1], "ZBVZeroBubble", 2, 3,
     "replicate", "full"),
], ids=lambda v: str(v) if isinstance(v, Fold) else None)
def test_pipeline_fixed_cases(pool, fold, name, split, schedule, spr, n, dp_mode, ac):
    layers = sum(split) if split else 4
    if schedule not in SCHEDULES:
        pytest.skip(f"{schedule} needs a newer torch")
    pool.run(check_pipeline_model, fold, name, layers, split, schedule, spr, n, 2, 1, 5,
             dp_mode, True, ac)


def check_errors():
    fm = folded_mesh(Fold(pp=2, tp=2, cp=1, ep=2, etp=1))
    with torch.device("meta"):
        tied = Transformer(preset("debug-qwen3"))  # tie_embeddings=True
        model = Transformer(MODELS["mixtral"])
    with pytest.raises(FoldError, match="tie_embeddings with pp = 2"):
        split_model(tied, fm)
    with pytest.raises(FoldError, match="split the model first"):
        parallelize(model, fm)
    with pytest.raises(FoldError, match="not a pipeline schedule"):
        split_model(model, fm, schedule="Zigzag")
    with pytest.raises(FoldError, match="2 layers cannot be split over 4 pipeline stages"):
        split_model(model, fm, schedule="Interleaved1F1B", stages_per_rank=2)
    parts = split_model(model, fm, schedule="GPipe")
    for part in parts:
        parallelize(part, fm)
        part.to_empty(device="cpu")
        part.init_weights(seed=0)
    with pytest.raises(FoldError, match="needs at least as many micro-batches"):
        apply_pipeline(parts, fm, schedule="1F1B", microbatches=1, microbatch_size=2,
                       seq_len=8)
    pipe = apply_pipeline(parts, fm, schedule="GPipe", microbatches=2, microbatch_size=1,
                          seq_len=8)
    ids = torch.zeros(2, 8, dtype=torch.long)
    pipe.step(ids, ids)  # the shape it was built for
    # a longer sequence, then a smaller batch: refused on every rank before any send
    for bad in (torch.zeros(2, 16, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)):
        with pytest.raises(FoldError, match=r"built for 2 sequences of 8 tokens"):
            pipe.step(bad, bad)


def test_errors_name_the_setting(pool):
    pool.run(check_errors)
