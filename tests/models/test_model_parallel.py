"""The parallelized model equals the single-process model: logits, every gradient, the norm.

8 gloo ranks, folds drawn by hypothesis (tp, cp, dp with etp, ep, edp, including etp != tp and
ep spanning cp), dropless, with FSDP2 applied as the README shows and with replication
(``reduce_gradients``) instead. The reference is the same plain model on one process, whose
logits are checked against Hugging Face transformers in test_hf.py.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from foldmesh import (
    Fold,
    FoldError,
    apply_fsdp,
    clip_grad_norm_,
    cross_entropy,
    distribute_tokens,
    grad_norm,
    natural_order,
    parallelize,
    reduce_gradients,
)
from foldmesh.data_parallel import scale_gradients
from foldmesh.models import Transformer, preset
from foldmesh.moe.parallel import FoldedExperts
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
MODELS = {  # every size divisible by tp <= 2 and by etp / ep up to 8
    "mixtral": preset("debug-mixtral", init_std=0.3, router_dtype="fp64"),
    "qwen2": preset("debug-qwen2", init_std=0.3, router_dtype="fp64"),
    "qwen3": preset("debug-qwen3", init_std=0.3, router_dtype="fp64"),
}


@pytest.fixture(scope="module")
def pool():
    with RankPool(WORLD, timeout=180) as p:
        yield p


def clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def reference(cfg, seed, B, S, dp=1):
    """The single-process model, its logits, and its gradients of the mean cross-entropy plus
    (when the config has them) the balancing losses: computed per data-parallel replica
    (sequences ``[d*b, (d+1)*b)``) and averaged over the dp replicas, as training defines
    them."""
    torch.manual_seed(seed)
    ref = Transformer(cfg, dtype=DTYPE)
    ref.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    labels = torch.randint(0, cfg.vocab_size, (B, S))
    for m in ref.modules():
        if hasattr(m, "loss_scale"):
            m.loss_scale = 1.0 / dp
    logits = torch.cat([ref(part) for part in ids.chunk(dp)])  # one replica at a time
    loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.reshape(-1))
    loss.backward()
    return ref, ids, labels, logits.detach(), loss.detach()


def readme_fsdp(model, fm):
    """FSDP2 written out as in the README."""
    factor = fm.fold.dp * fm.fold.cp  # every gradient is a sum over ranks divided by dp·cp
    for block in model.layers.values():
        experts = [m for m in block.modules() if isinstance(m, FoldedExperts)]
        ignored = set()
        for ex in experts:
            if fm.fold.edp > 1:
                fully_shard(ex, mesh=fm["edp"])
                ex.set_gradient_divide_factor(factor)
                ex.set_force_sum_reduction_for_comms(True)   # plain sums: gloo has no PreMulSum
            else:
                ignored |= set(ex.parameters())
                scale_gradients(ex.parameters(), factor)
        fully_shard(block, mesh=fm["dp_cp"], ignored_params=ignored or None)
        block.set_gradient_divide_factor(factor)
    fully_shard(model, mesh=fm["dp_cp"])
    model.set_gradient_divide_factor(factor)


def check_model(fold, name, dp_mode, b, m, seed, dispatcher, ac, aux=False, sharded=False):
    fm = folded_mesh(fold)
    cfg = MODELS[name]
    if aux:
        cfg = replace(cfg, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    B, S = b * fold.dp, m * 2 * fold.cp * fold.tp
    ref, ids, labels, ref_logits, ref_loss = reference(cfg, seed, B, S, fold.dp)

    with torch.device("meta"):
        model = Transformer(cfg, dtype=DTYPE)
    parallelize(model, fm, dispatcher=dispatcher, activation_checkpoint=ac)
    model.to_empty(device="cpu")
    model.tie_weights()
    load_reference(model, ref)
    if dp_mode == "fsdp_readme":
        readme_fsdp(model, fm)
    elif dp_mode == "fsdp":
        apply_fsdp(model, fm)

    logits = model(distribute_tokens(ids, fm) if sharded else ids)
    assert isinstance(logits, DTensor) and logits.device_mesh == fm.attn_stage
    got = natural_order(logits.full_tensor(), fold.cp)
    assert_close_to_reference(got, ref_logits, name="logits", **TOL)
    loss = cross_entropy(logits, labels, fm)
    mean = loss.detach().clone()
    torch.distributed.all_reduce(mean, group=fm["dp_cp"].get_group())
    assert_close_to_reference(mean / (fold.dp * fold.cp), ref_loss, name="loss", **TOL)
    loss.backward()
    if dp_mode == "replicate":
        reduce_gradients(model, fm)
    refs = dict(ref.named_parameters())
    seen = set()
    for pname, p in model.named_parameters():
        r = refs[clean(pname)]
        g = p.grad
        assert g is not None, f"{pname} got no gradient"
        assert_close_to_reference(g, r.grad, name=f"grad of {pname}", **TOL)
        seen.add(clean(pname))
    assert seen == set(refs), f"parameters missing: {set(refs) - seen}"

    want = torch.sqrt(sum(r.grad.double().pow(2).sum() for r in refs.values()))
    norm = grad_norm(model, fm)
    assert_close_to_reference(norm, want, name="grad norm", **TOL)
    clip_grad_norm_(model, fm, max_norm=0.25 * want.item())
    assert_close_to_reference(grad_norm(model, fm), 0.25 * want, name="clipped norm", rtol=1e-5)


@settings(max_examples=7, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fold=folds(WORLD, pp=(1,), max_tp=2), name=st.sampled_from(sorted(MODELS)),
       dp_mode=st.sampled_from(["fsdp_readme", "fsdp", "replicate"]),
       b=st.integers(1, 2), m=st.integers(1, 2), seed=st.integers(0, 2**16),
       dispatcher=st.sampled_from(["alltoall", "allgather"]),
       ac=st.sampled_from(["none", "full"]), aux=st.booleans(), sharded=st.booleans())
# a CI draw: the all-gather dispatcher's fp64 combine weights once came back rounded to fp32
@example(fold=Fold(tp=1, cp=1, dp=8, pp=1, etp=2, ep=1, edp=4), name="mixtral",
         dp_mode="fsdp_readme", b=1, m=2, seed=7599, dispatcher="allgather", ac="none",
         aux=False, sharded=False)
def test_parallel_model_equals_single_process(pool, fold, name, dp_mode, b, m, seed,
                                              dispatcher, ac, aux, sharded):
    pool.run(check_model, fold, name, dp_mode, b, m, seed, dispatcher, ac, aux, sharded)


@pytest.mark.parametrize("fold,dp_mode", [
    (Fold(tp=2, cp=4, dp=1, ep=4, etp=2), "replicate"),   # cp > 1: the losses' cp scale
    (Fold(tp=1, cp=2, dp=4, ep=2, etp=2), "fsdp"),        # edp = 2 != dp*cp = 8
    (Fold(tp=1, cp=2, dp=4, ep=2, etp=2), "fsdp_readme"),
], ids=str)
def test_gradient_scales(pool, fold, dp_mode):
    """Expert and dense gradients are scaled alike (FSDP's default would divide experts by
    edp), and the balancing losses weigh each replica once (scaled by cp, divided by dp·cp)."""
    pool.run(check_model, fold, "qwen2", dp_mode, 1, 1, 3, "alltoall", "none", True)


def check_errors(fold):
    fm = folded_mesh(fold)
    with torch.device("meta"):
        model = Transformer(MODELS["mixtral"], dtype=DTYPE)
    with pytest.raises(FoldError, match="without sequence parallelism"):
        parallelize(model, fm, sequence_parallel=False)
    parallelize(model, fm)
    model.to_empty(device="cpu")
    model.init_weights()
    with pytest.raises(FoldError, match="sequence length 6 does not split"):
        model(torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(FoldError, match="batch size 1 is not divisible by dp = 2"):
        model(torch.zeros(1, 8, dtype=torch.long))


def test_errors_name_the_setting(pool):
    pool.run(check_errors, Fold(tp=2, cp=2, dp=2, ep=4, etp=2))


def check_init(fold, name, ac):
    """``foldmesh.init_weights`` gives the single-process ``init_weights(seed)`` values on any
    fold (on CPU DTensor's own draws would depend on the layout)."""
    from foldmesh import init_weights

    fm = folded_mesh(fold)
    cfg = MODELS[name]
    with torch.device("meta"):
        model = Transformer(cfg, dtype=DTYPE)
    parallelize(model, fm, activation_checkpoint=ac)
    model.to_empty(device="cpu")
    init_weights(model, 11)
    ref = Transformer(cfg, dtype=DTYPE)
    ref.init_weights(seed=11)
    want = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    for pname, t in [*model.named_parameters(), *model.named_buffers()]:
        got = t.full_tensor() if isinstance(t, DTensor) else t
        assert torch.equal(got, want[clean(pname)]), pname


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fold=folds(WORLD, pp=(1,), max_tp=2), name=st.sampled_from(sorted(MODELS)),
       ac=st.sampled_from(["none", "full"]))
def test_init_weights_do_not_depend_on_the_fold(pool, fold, name, ac):
    pool.run(check_init, fold, name, ac)
