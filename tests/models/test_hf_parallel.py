"""``from_pretrained(path, mesh=fm)`` on 4 and 8 gloo ranks gives transformers' logits.

The checkpoints are tiny random transformers models saved by transformers itself; each rank
loads only its slices, under folds drawn by hypothesis (etp != tp, ep spanning cp, ...), with
and without FSDP2 on top.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foldmesh import Fold, apply_fsdp, from_pretrained, natural_order
from foldmesh.testing import RankPool, assert_close_to_reference, folded_mesh, folds

transformers = pytest.importorskip("transformers")

FAMILIES = {  # 8 experts, 2 kv heads: every ep and etp of 8 ranks, tp <= 2
    "mixtral": dict(model_type="mixtral", num_local_experts=8, intermediate_size=16),
    "qwen2": dict(model_type="qwen2_moe", num_experts=8, moe_intermediate_size=8,
                  shared_expert_intermediate_size=16, intermediate_size=32,
                  mlp_only_layers=[0]),
    # with YaRN: 16 positions, 4x the original 4, a blended pair range (the pairs are
    # rotated per rank's positions under cp)
    "qwen3": dict(model_type="qwen3_moe", num_experts=8, moe_intermediate_size=8,
                  head_dim=8, norm_topk_prob=True, tie_word_embeddings=True,
                  max_position_embeddings=16,
                  rope_parameters=dict(rope_type="yarn", rope_theta=100.0, factor=4.0,
                                       original_max_position_embeddings=4, beta_fast=2.0,
                                       beta_slow=0.25)),
}
SETTINGS = settings(max_examples=6, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (directory, token ids [8, 16], transformers' logits [8, 16, V])."""
    out = {}
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    for name, kw in FAMILIES.items():
        kw = dict(kw)
        cfg = transformers.AutoConfig.for_model(
            kw.pop("model_type"), vocab_size=64, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, **kw)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        with torch.no_grad():
            out[name] = (str(path), ids, model(ids).logits)
    return out


def check_load(fold, path, ids, want, fsdp):
    fm = folded_mesh(fold)
    model = from_pretrained(path, mesh=fm)
    if fsdp:
        apply_fsdp(model, fm)
    with torch.no_grad():
        logits = model(ids)
    assert_close_to_reference(natural_order(logits.full_tensor(), fold.cp), want,
                              name="logits", rtol=1e-4, atol=1e-5)


def run(pool, checkpoints, fold, family, fsdp):
    path, ids, want = checkpoints[family]
    pool.run(check_load, fold, path, ids, want, fsdp)


@pytest.fixture(scope="module")
def pool4():
    with RankPool(4, timeout=120) as p:
        yield p


@SETTINGS
@given(fold=folds(4, pp=(1,), max_tp=2), family=st.sampled_from(sorted(FAMILIES)),
       fsdp=st.booleans())
def test_from_pretrained_on_4_ranks(pool4, checkpoints, fold, family, fsdp):
    run(pool4, checkpoints, fold, family, fsdp)


@pytest.fixture(scope="module")
def pool8(pool4):
    # one pool at a time: 12 ranks on 2 cores would only slow both down
    pool4.close()
    with RankPool(8, timeout=120) as p:
        yield p


@SETTINGS
@given(fold=folds(8, pp=(1,), max_tp=2), family=st.sampled_from(sorted(FAMILIES)),
       fsdp=st.booleans())
def test_from_pretrained_on_8_ranks(pool8, checkpoints, fold, family, fsdp):
    run(pool8, checkpoints, fold, family, fsdp)


def test_yarn_under_context_parallelism(pool8, checkpoints):
    """A pinned fold for the YaRN family: cp 2 (load-balanced chunks, positions per rank)
    with tp 2 and the experts over ep 4."""
    run(pool8, checkpoints, Fold(tp=2, cp=2, ep=4).resolve(8), "qwen3", False)
