"""The DeepSeek-V3 family (DeepSeek-V3/R1, Kimi K2, Moonlight, DeepSeek-V2-Lite's shapes):
Multi-head Latent Attention and the group-limited sigmoid router against transformers'
DeepseekV3ForCausalLM, on one process and under folds of 4 gloo ranks (tp, cp, ep, etp), the
bit-exact Hugging Face round trip, and the errors.

The checkpoints are tiny random transformers models saved by transformers itself: low-rank
or plain query, a dense first layer, two shared experts, group-limited sigmoid routing with
a non-zero correction bias, YaRN with DeepSeek's two magnitudes, interleaved RoPE pairs.
"""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from foldmesh import Fold, FoldError, cross_entropy, natural_order, reduce_gradients  # noqa: E402
from foldmesh.hf import (  # noqa: E402
    CheckpointError,
    config_from_hf,
    from_pretrained,
    hf_config_from,
    save_pretrained,
)
from foldmesh.models import PRESETS, ModelConfig, Transformer, preset  # noqa: E402
from foldmesh.parallelize import check_model  # noqa: E402
from foldmesh.testing import (  # noqa: E402
    RankPool,
    assert_close_to_reference,
    folded_mesh,
    folds,
)

CONFIG = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=8, n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=2, n_group=4, topk_group=2, first_k_dense_replace=1,
    q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
    routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=256,
    # a blended pair range inside qk_rope_head_dim 4, and mscale_all_dim != mscale: the
    # rotated pairs' magnitude and the softmax scale both differ from 1
    rope_parameters=dict(rope_type="yarn", rope_theta=100.0, factor=4.0,
                         original_max_position_embeddings=64, beta_fast=8.0, beta_slow=0.5,
                         mscale=1.0, mscale_all_dim=0.8),
)
CASES = {"v3": {}, "plain-q": dict(q_lora_rank=None)}  # plain-q: DeepSeek-V2-Lite's query
TOL = dict(rtol=1e-4, atol=1e-5)


def build_hf(**overrides):
    """A random fp32 DeepseekV3ForCausalLM; norms ~ 1 + noise, a random correction bias."""
    cfg = transformers.AutoConfig.for_model("deepseek_v3", **{**CONFIG, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.5)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """case -> (directory saved by transformers, the transformers model)."""
    made = {}

    def get(case):
        if case not in made:
            model = build_hf(**CASES[case])
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(path)
            made[case] = path, model
        return made[case]

    return get


def input_ids(shape=(2, 9)):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(1))


def worst_relative(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def read_all(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(f))
    return out


# ------------------------------------------------------------------------ numerics, round trip
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(checkpoint, case):
    path, hf = checkpoint(case)
    model = from_pretrained(path)
    cfg = model.config
    assert cfg.is_mla and cfg.score_function == "sigmoid" and cfg.expert_bias
    assert (cfg.num_expert_groups, cfg.topk_groups, cfg.first_k_dense) == (4, 2, 1)
    assert cfg.shared_ffn_size == 16 and cfg.rope_interleave
    bias = model.layers["1"].ffn.router.expert_bias
    assert torch.equal(bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)
    with torch.no_grad():
        got, want = model(input_ids()), hf(input_ids()).logits
    assert worst_relative(got, want) <= 1e-4
    # every DeepSeek feature moves the logits: the test above would see each one wrong
    for attr, value in (("interleave", False), ("q_scale", 1.0)):
        for m in model.modules():
            if hasattr(m, attr):
                setattr(m, attr, value)
        with torch.no_grad():
            assert worst_relative(model(input_ids()), want) > 1e-2, attr
        model = from_pretrained(path)
    bias = model.layers["1"].ffn.router.expert_bias
    bias.zero_()
    with torch.no_grad():
        assert worst_relative(model(input_ids()), want) > 1e-2


@pytest.mark.parametrize("case", CASES)
def test_save_round_trip_is_exact(checkpoint, tmp_path, case):
    path, hf = checkpoint(case)
    save_pretrained(from_pretrained(path), tmp_path / "out")
    ours, theirs = read_all(tmp_path / "out"), read_all(path)
    assert sorted(ours) == sorted(theirs)
    assert any(n.endswith("e_score_correction_bias") for n in ours)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info
    assert type(back).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids()).logits, hf(input_ids()).logits,
                                   **TOL)


def test_kimi_k2_config_reads_as_deepseek_v3(checkpoint, tmp_path):
    """Kimi K2's config.json names model_type "kimi_k2" (unknown to transformers) with the
    DeepseekV3ForCausalLM architecture and DeepSeek-V3's keys; it is read the same way."""
    src, hf = checkpoint("v3")
    path = tmp_path / "kimi"
    shutil.copytree(src, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    (path / "config.json").write_text(json.dumps(cfg))
    model = from_pretrained(path)
    with torch.no_grad():
        assert worst_relative(model(input_ids()), hf(input_ids()).logits) <= 1e-4


def test_mtp_layers_skipped_other_tensors_refused(checkpoint, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint("v3")[0], path)
    cfg = json.loads((path / "config.json").read_text())
    tensors = safetensors_torch.load_file(path / "model.safetensors")
    # an MTP module: layer num_hidden_layers = 3, declared by num_nextn_predict_layers
    tensors["model.layers.3.eh_proj.weight"] = torch.ones(32, 64)
    tensors["model.layers.3.self_attn.kv_b_proj.weight"] = torch.ones(4, 12)
    safetensors_torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match="model.layers.3"):
        from_pretrained(path)
    tensors["model.layers.1.mlp.gate.weight_scale_inv"] = torch.ones(1)
    safetensors_torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    with pytest.raises(CheckpointError, match="weight_scale_inv"):
        from_pretrained(path)


def test_missing_correction_bias_named(checkpoint, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint("v3")[0], path)
    tensors = safetensors_torch.load_file(path / "model.safetensors")
    tensors.pop("model.layers.2.mlp.gate.e_score_correction_bias")
    safetensors_torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"e_score_correction_bias.*router\.expert_bias"):
        from_pretrained(path)


@pytest.mark.parametrize("setting,value", [
    ("scoring_func", "softmax"), ("topk_method", "greedy"), ("moe_layer_freq", 2),
    ("attention_bias", True), ("num_key_value_heads", 2), ("n_shared_experts", 0),
    ("quantization_config", {"quant_method": "fp8"}),
])
def test_unsupported_deepseek_setting_named(checkpoint, setting, value):
    cfg = json.loads((checkpoint("v3")[0] / "config.json").read_text())
    cfg[setting] = value
    with pytest.raises(CheckpointError, match=setting):
        config_from_hf(cfg)


# ------------------------------------------------------------------------- config, presets
def test_debug_preset_is_every_feature_and_counts_its_parameters():
    cfg = PRESETS["debug-deepseek"]
    assert cfg.is_mla and cfg.q_lora_rank and cfg.rope_interleave and cfg.expert_bias
    assert cfg.num_expert_groups and cfg.first_k_dense and cfg.shared_ffn_size
    assert cfg.rope_scaling is not None and cfg.rope_scaling.mscale_all_dim
    model = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    back, arch = config_from_hf(hf_config_from(cfg, "DeepseekV3ForCausalLM"))
    assert arch == "DeepseekV3ForCausalLM" and back == cfg
    for name in ("deepseek-v3", "deepseek-v2-lite", "moonlight-16b-a3b", "kimi-k2"):
        assert PRESETS[name].is_mla, name


def test_mla_settings_need_kv_lora_rank():
    with pytest.raises(ValueError, match="q_lora_rank.*kv_lora_rank is None.*set kv_lora_rank"):
        ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=4,
                    expert_ffn_size=8, q_lora_rank=16, qk_rope_head_dim=4)
    with pytest.raises(ValueError, match="v_head_dim must be a positive int"):
        preset("debug-deepseek", v_head_dim=None)
    with pytest.raises(ValueError, match="num_kv_heads=2 differs.*num_kv_heads = num_heads"):
        preset("debug-deepseek", num_kv_heads=2)
    with pytest.raises(ValueError, match="num_expert_groups=3 must divide num_experts=8"):
        preset("debug-deepseek", num_expert_groups=3)


def test_fold_errors_name_the_setting():
    with torch.device("meta"):
        model = Transformer(preset("debug-deepseek", num_heads=6, num_kv_heads=6))
    # foldmesh.parallelize checks sizes before touching a process group
    fm = SimpleNamespace(fold=Fold(tp=4, ep=2).resolve(8))
    with pytest.raises(FoldError, match=r"ModelConfig.num_heads = 6 is not divisible by tp = 4"):
        check_model(model, fm)
    check_model(model, SimpleNamespace(fold=Fold(cp=2, ep=2).resolve(2)))  # cp: the latent


# --------------------------------------------------------- parallel, 4 ranks: tp, cp, ep, etp
def check_parallel(fold, path, ids, labels, want_logits, want_grads):
    fm = folded_mesh(fold)
    model = from_pretrained(path, mesh=fm)
    logits = model(ids)
    got = natural_order(logits.full_tensor(), fold.cp)
    assert_close_to_reference(got, want_logits, name="logits", rtol=1e-4, atol=1e-5)
    cross_entropy(logits, labels, fm).backward()
    reduce_gradients(model, fm)
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        assert_close_to_reference(g, want_grads[name], name=f"grad of {name}", rtol=1e-4,
                                  atol=1e-6)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The single-process model's logits and gradients of the mean cross-entropy (checked
    against transformers above), for token ids [4, 16]."""
    path, _ = checkpoint("v3")
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    model = from_pretrained(path)
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return str(path), ids, labels, logits.detach(), grads


@pytest.fixture(scope="module")
def pool4():
    with RankPool(4, timeout=120) as p:
        yield p


@pytest.mark.parametrize("fold", [Fold(tp=2, ep=4), Fold(tp=2, ep=2, etp=2),
                                  Fold(cp=2, tp=2, ep=2, etp=2)], ids=str)
def test_pinned_folds(pool4, reference, fold):
    """Heads over tp 2 with the experts over ep 4 (across tp and dp), with etp 2, and with
    the sequence over cp 2 (the latent exchanged, tests/models/test_mla_cp.py)."""
    pool4.run(check_parallel, fold.resolve(4), *reference)


@settings(max_examples=2, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fold=folds(4, pp=(1,), max_tp=2))
def test_folds_of_4_ranks(pool4, reference, fold):
    pool4.run(check_parallel, fold, *reference)

