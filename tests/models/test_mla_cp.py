"""Context parallelism for Multi-head Latent Attention: the latent exchange is exact and small.

4 gloo ranks, float64. Folds with cp 2 (with dp, with tp 2, with ep and etp, with activation
checkpointing) and cp 4 give the single-process model's logits, loss and every gradient,
for DeepSeek-V3's shapes with YaRN (the softmax scale's and the rotated pairs' magnitudes
differ from 1) and interleaved RoPE, and for DeepSeek-V2-Lite's plain query without YaRN.
The collectives over cp are exactly one all-gather of kv_lora_rank + qk_rope_head_dim values
per token and layer forward and its reduce-scatter backward: no per-head K or V crosses cp.
"""

import pytest
import torch
import torch.nn.functional as F

from foldmesh import Fold, cross_entropy, natural_order, parallelize, reduce_gradients
from foldmesh.models import Transformer, preset
from foldmesh.testing import (
    CollectiveCounter,
    RankPool,
    assert_close_to_reference,
    folded_mesh,
    load_reference,
)

WORLD = 4
DTYPE = torch.float64
TOL = dict(rtol=1e-6, atol=1e-8)
MODELS = {
    # DeepSeek-V3's layout: low-rank query, YaRN with mscale_all_dim, interleaved pairs
    "v3-yarn": preset("debug-deepseek", init_std=0.3, router_dtype="fp64"),
    # DeepSeek-V2-Lite's: plain query, plain RoPE
    "plain-q": preset("debug-deepseek", init_std=0.3, router_dtype="fp64", q_lora_rank=None,
                      rope_scaling=None),
}


@pytest.fixture(scope="module")
def pool():
    with RankPool(WORLD, timeout=180) as p:
        yield p


def build(cfg, seed):
    """The single-process model with non-trivial norms and a correction bias."""
    torch.manual_seed(seed)
    ref = Transformer(cfg, dtype=DTYPE)
    ref.init_weights()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
        for name, b in ref.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.randn_like(b) * 0.5)
    return ref


def parallel(fold, cfg, ref, ac="none"):
    fm = folded_mesh(fold)
    with torch.device("meta"):
        model = Transformer(cfg, dtype=DTYPE)
    parallelize(model, fm, activation_checkpoint=ac)
    model.to_empty(device="cpu")
    model.tie_weights()
    load_reference(model, ref)
    bufs = dict(ref.named_buffers())
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(bufs[name.replace("_checkpoint_wrapped_module.", "")])
    return fm, model


def check_equal(fold, name, b, seed, ac):
    cfg = MODELS[name]
    B, S = b * fold.dp, 2 * fold.cp * fold.tp * 2
    ref = build(cfg, seed)
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    labels = torch.randint(0, cfg.vocab_size, (B, S))
    want = torch.cat([ref(part) for part in ids.chunk(fold.dp)])
    F.cross_entropy(want.reshape(-1, cfg.vocab_size), labels.reshape(-1)).backward()

    fm, model = parallel(fold, cfg, ref, ac)
    logits = model(ids)
    got = natural_order(logits.full_tensor(), fold.cp)
    assert_close_to_reference(got, want.detach(), name="logits", **TOL)
    cross_entropy(logits, labels, fm).backward()
    reduce_gradients(model, fm)
    refs = dict(ref.named_parameters())
    seen = set()
    for pname, p in model.named_parameters():
        clean = pname.replace("_checkpoint_wrapped_module.", "")
        assert p.grad is not None, f"{pname} got no gradient"
        assert_close_to_reference(p.grad, refs[clean].grad, name=f"grad of {pname}", **TOL)
        seen.add(clean)
    assert seen == set(refs)


@pytest.mark.parametrize("fold,name,b,ac", [
    (Fold(cp=2, dp=2, ep=4), "v3-yarn", 1, "none"),               # ep across dp and cp
    (Fold(cp=2, tp=2, ep=2, etp=2), "v3-yarn", 2, "full"),        # tp first, then cp
    (Fold(cp=2, tp=2, ep=4), "plain-q", 1, "none"),
    (Fold(cp=4, ep=2, etp=2), "plain-q", 1, "none"),              # 8 chunks
], ids=lambda v: str(v) if isinstance(v, Fold) else None)
def test_mla_cp_equals_single_process(pool, fold, name, b, ac):
    pool.run(check_equal, fold.resolve(WORLD), name, b, 5, ac)


def check_collectives(fold, name):
    """Over cp, per MLA layer: forward one all-gather of this rank's [b, S/cp, Rkv + Dr];
    backward its reduce-scatter of [b, S, Rkv + Dr]; nothing else. With tp > 1, c's
    gradient is summed over tp on this cp rank's tokens only: [b, S/cp, Rkv]."""
    cfg = MODELS[name]
    b, S = 1, 2 * fold.cp * fold.tp * 2
    ref = build(cfg, 1)
    fm, model = parallel(fold, cfg, ref)
    ids = torch.randint(0, cfg.vocab_size, (b * fold.dp, S))
    counter = CollectiveCounter(fm)
    with counter:
        cross_entropy(model(ids), ids, fm).backward()
    cp, tp = counter.axis_of("cp"), counter.axis_of("tp")
    assert cp == "cp", counter.table()
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * DTYPE.itemsize
    layers = cfg.num_layers
    on_cp = sorted((r.kind, r.direction, r.bytes) for r in counter.records if r.axis == cp)
    assert on_cp == sorted(
        [("all_gather", "forward", b * S // fold.cp * per_token)] * layers
        + [("reduce_scatter", "backward", b * S * per_token)] * layers), counter.table()
    if fold.tp > 1:
        sums = [r.bytes for r in counter.records
                if (r.kind, r.axis, r.direction) == ("all_reduce", tp, "backward")]
        latent = b * cfg.kv_lora_rank * DTYPE.itemsize
        assert sums.count(latent * S // fold.cp) == layers, counter.table()
        assert latent * S not in sums, counter.table()  # not the whole sequence's gradient


@pytest.mark.parametrize("fold", [Fold(cp=2, tp=2, ep=2, etp=2), Fold(cp=2, dp=2, ep=4)],
                         ids=str)
def test_cp_exchanges_only_the_latent(pool, fold):
    pool.run(check_collectives, fold.resolve(WORLD), "v3-yarn")


def check_autocast(fold):
    """Under bf16 autocast the exchange carries bf16, the dtype kv_b_proj casts c to anyway
    (kv_a_norm returns fp32 there; gathered as fp32, the RoPE key would reach SDPA as fp32
    against bf16 queries)."""
    cfg = MODELS["v3-yarn"]
    b, S = 1, 2 * fold.cp * fold.tp * 2
    ref = build(cfg, 2).float()
    fm, model = parallel(fold, cfg, ref)
    model.float()
    ids = torch.randint(0, cfg.vocab_size, (b * fold.dp, S))
    counter = CollectiveCounter(fm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.cat([ref(part) for part in ids.chunk(fold.dp)])
        with counter:
            logits = model(ids)
    gathers = [r.bytes for r in counter.records if (r.kind, r.axis) == ("all_gather", "cp")]
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * torch.bfloat16.itemsize
    assert gathers == [b * S // fold.cp * per_token] * cfg.num_layers, counter.table()
    got = natural_order(logits.full_tensor(), fold.cp).float()
    # bf16 attention over chunks with a mask rounds differently from one causal call
    assert ((got - want.float()).abs().max() / want.float().abs().max()).item() < 3e-2


def test_cp_exchange_in_autocast_dtype(pool):
    pool.run(check_autocast, Fold(cp=2, dp=2, ep=4).resolve(WORLD))
