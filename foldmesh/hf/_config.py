"""Hugging Face config.json <-> ``ModelConfig`` for Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3.

Routing in the three families, and the foldmesh settings that compute the same weights:

- Mixtral: softmax over all E, top k, renormalise = softmax over the k chosen logits
  (``softmax_over_all=False``).
- Qwen2/3-MoE: softmax over all E, top k, renormalise only if ``norm_topk_prob``
  (``softmax_over_all=True, normalize_topk=norm_topk_prob``).
- DeepSeek-V3 (also Kimi K2, Moonlight: ``model_type`` "kimi_k2" or "deepseek_v3" with
  ``DeepseekV3ForCausalLM``, which transformers' class reads): sigmoid scores plus the
  correction bias select the top k among the ``topk_group`` best of ``n_group`` groups (each
  scored by its 2 best biased scores); the weights are the unbiased sigmoids, renormalised if
  ``norm_topk_prob``, times ``routed_scaling_factor`` (``score_function="sigmoid",
  expert_bias=True``, groups, ``routed_scaling_factor``). Multi-head Latent Attention, dense
  first layers and ``n_shared_experts`` shared experts of ``moe_intermediate_size`` each (one
  ungated shared expert of their total size).

Training-only settings (capacity factor, balancing losses) have no config.json counterpart:
they take ``ModelConfig``'s defaults on load (override them with ``config_overrides``) and
are not written on save.
"""

from __future__ import annotations

from typing import Any

from ..models import ModelConfig
from ..models.rope import Yarn
from ._names import ARCHITECTURES, CheckpointError

# (rms_norm_eps, rope_theta) that transformers uses when config.json omits them.
_DEFAULTS = {"mixtral": (1e-5, 1e6), "qwen2_moe": (1e-6, 1e4), "qwen3_moe": (1e-6, 1e4),
             "deepseek_v3": (1e-6, 1e4)}

# What transformers' DeepseekV3Config assumes for keys config.json omits.
_DEEPSEEK_DEFAULTS = {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                      "qk_rope_head_dim": 64, "v_head_dim": 128, "n_group": 8, "topk_group": 4,
                      "first_k_dense_replace": 3, "norm_topk_prob": True,
                      "routed_scaling_factor": 2.5, "n_shared_experts": 1,
                      "rope_interleave": True}

# Keys of a loaded config.json that foldmesh does not model but writes back unchanged.
_PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
                "max_window_layers", "use_cache", "attention_dropout", "router_aux_loss_coef",
                "router_jitter_noise", "output_router_logits", "intermediate_size")


def _need(hf: dict, *keys: str) -> Any:
    """The first of ``keys`` present in config.json (aliases of one setting)."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    raise CheckpointError(f"config.json has no {keys[0]!r}; add it (the model's "
                          f"{keys[0].replace('_', ' ')})")


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return a
    if not archs:
        by_type = {t: a for a, t in ARCHITECTURES.items()}
        if hf.get("model_type") in by_type:
            return by_type[hf["model_type"]]
    raise CheckpointError(
        f"config.json architectures={archs!r} (model_type={hf.get('model_type')!r}) is not "
        f"supported; foldmesh reads {sorted(ARCHITECTURES)}"
    )


def _rope(hf: dict, default: float) -> tuple[float, Yarn | None]:
    """RoPE's theta and scaling from ``rope_parameters`` (transformers 5) or the older
    top-level ``rope_theta`` and ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    params = {**(hf.get("rope_scaling") or {}), **params}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", default)))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise CheckpointError(f"config.json rope_type={kind!r} is not supported: foldmesh "
                              "implements plain RoPE and YaRN ('yarn')")
    original = _need(params, "original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:  # DeepSeek-style: the ratio of the two context lengths
        factor = _need(hf, "max_position_embeddings") / original
    return theta, Yarn(
        factor=float(factor), original_max_position=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 1),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)))


def _rope_parameters(cfg: ModelConfig) -> dict:
    y = cfg.rope_scaling
    if y is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": y.factor,
           "original_max_position_embeddings": y.original_max_position,
           "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "truncate": y.truncate}
    if y.mscale and y.mscale_all_dim:
        out.update(mscale=y.mscale, mscale_all_dim=y.mscale_all_dim)
    if y.attention_factor is not None:
        out["attention_factor"] = y.attention_factor
    return out


def _check_attention(hf: dict, model_type: str) -> None:
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"config.json hidden_act={hf['hidden_act']!r} is not supported: "
                              "foldmesh's MLPs are SwiGLU (hidden_act='silu')")
    if model_type == "mixtral" and hf.get("sliding_window") is not None:
        raise CheckpointError(f"config.json sliding_window={hf['sliding_window']} is not "
                              "supported: foldmesh attention is full causal; set it to null")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if hf.get("use_sliding_window") or layer_types != {"full_attention"}:
        raise CheckpointError("config.json use_sliding_window/layer_types ask for sliding-window "
                              "attention, which foldmesh does not implement; set "
                              "use_sliding_window=false")


def config_from_hf(hf: dict) -> tuple[ModelConfig, str]:
    """The ``ModelConfig`` of a Hugging Face config.json (as a dict) and its architecture.

    Raises:
        CheckpointError: unsupported architecture or setting (the message names it).
    """
    arch = _architecture(hf)
    model_type = ARCHITECTURES[arch]
    _check_attention(hf, model_type)
    eps, theta = _DEFAULTS[model_type]
    theta, rope_scaling = _rope(hf, theta)
    heads = _need(hf, "num_attention_heads")
    common = dict(
        vocab_size=_need(hf, "vocab_size"), hidden_size=_need(hf, "hidden_size"),
        num_layers=_need(hf, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim"),
        num_experts=_need(hf, "num_local_experts", "num_experts", "n_routed_experts"),
        topk=_need(hf, "num_experts_per_tok"),
        rope_theta=theta, rope_scaling=rope_scaling, norm_eps=float(hf.get("rms_norm_eps", eps)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    if model_type == "mixtral":
        return ModelConfig(**common, expert_ffn_size=_need(hf, "intermediate_size")), arch
    if model_type == "deepseek_v3":
        return ModelConfig(**{**common, **_deepseek(hf, heads)}), arch
    qwen = dict(
        expert_ffn_size=_need(hf, "moe_intermediate_size"),
        ffn_size=hf.get("intermediate_size") or 0, softmax_over_all=True,
        normalize_topk=bool(hf.get("norm_topk_prob", False)),
        moe_every=hf.get("decoder_sparse_step", 1),
        dense_layers=tuple(sorted(hf.get("mlp_only_layers") or ())),
    )
    if model_type == "qwen2_moe":
        shared = _need(hf, "shared_expert_intermediate_size")
        if shared <= 0:
            raise CheckpointError(f"config.json shared_expert_intermediate_size={shared} is not "
                                  "supported: Qwen2-MoE's shared expert must have a size > 0")
        return ModelConfig(**common, **qwen, shared_ffn_size=shared, shared_gate=True,
                           qkv_bias=bool(hf.get("qkv_bias", True))), arch
    if hf.get("attention_bias"):
        raise CheckpointError("config.json attention_bias=true is not supported: it adds a bias "
                              "to o_proj, which foldmesh's attention does not have")
    return ModelConfig(**common, **qwen, qk_norm=True), arch


def _deepseek(hf: dict, heads: int) -> dict:
    """The DeepSeek-V3-specific ``ModelConfig`` fields of a config.json."""

    def get(key):
        return hf[key] if key in hf else _DEEPSEEK_DEFAULTS[key]

    if hf.get("quantization_config"):
        raise CheckpointError("config.json has a quantization_config (e.g. DeepSeek's FP8 "
                              "weights): foldmesh reads unquantized weights; convert them to "
                              "bf16 first (DeepSeek's fp8_cast_bf16.py) and drop the key")
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if hf.get(key, want) != want:
            raise CheckpointError(
                f"config.json {key}={hf[key]!r} is not supported for DeepseekV3ForCausalLM: "
                f"its router (as transformers runs it) is {key}={want!r}")
    if hf.get("moe_layer_freq", 1) != 1:
        raise CheckpointError(f"config.json moe_layer_freq={hf['moe_layer_freq']} is not "
                              "supported: every layer after first_k_dense_replace is MoE "
                              "in DeepseekV3ForCausalLM; set it to 1")
    if hf.get("attention_bias"):
        raise CheckpointError("config.json attention_bias=true is not supported: foldmesh's "
                              "Multi-head Latent Attention has no biases")
    if hf.get("num_key_value_heads") not in (None, heads):
        raise CheckpointError(
            f"config.json num_key_value_heads={hf['num_key_value_heads']} differs from "
            f"num_attention_heads={heads}: Multi-head Latent Attention has a key and a value "
            "per head; set num_key_value_heads to num_attention_heads")
    shared = get("n_shared_experts") or 0
    if shared <= 0:
        raise CheckpointError(f"config.json n_shared_experts={shared} is not supported: "
                              "DeepseekV3ForCausalLM always has a shared expert (>= 1)")
    groups, kept = get("n_group"), get("topk_group")
    grouped = groups is not None and groups > 1  # one group keeps every expert: no limit
    moe = _need(hf, "moe_intermediate_size")
    return dict(
        num_kv_heads=heads, head_dim=None,
        num_experts=_need(hf, "n_routed_experts", "num_local_experts"),
        expert_ffn_size=moe, ffn_size=hf.get("intermediate_size") or 0,
        shared_ffn_size=shared * moe, first_k_dense=get("first_k_dense_replace") or 0,
        score_function="sigmoid", expert_bias=True, normalize_topk=bool(get("norm_topk_prob")),
        routed_scaling_factor=float(get("routed_scaling_factor")),
        num_expert_groups=groups if grouped else None, topk_groups=kept if grouped else None,
        kv_lora_rank=get("kv_lora_rank"), q_lora_rank=get("q_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
        v_head_dim=get("v_head_dim"), rope_interleave=bool(get("rope_interleave")),
    )


def infer_architecture(cfg: ModelConfig) -> str:
    """The Hugging Face architecture whose features ``cfg`` uses (checked on save)."""
    if cfg.is_mla:
        return "DeepseekV3ForCausalLM"
    if cfg.shared_ffn_size:
        return "Qwen2MoeForCausalLM"
    return "Qwen3MoeForCausalLM" if cfg.qk_norm else "MixtralForCausalLM"


def _unsupported(cfg: ModelConfig, architecture: str) -> str | None:
    """Why ``architecture`` cannot express ``cfg``, or None."""
    if architecture == "DeepseekV3ForCausalLM":
        return _unsupported_deepseek(cfg)
    if cfg.is_mla:
        return f"its attention is grouped-query, but kv_lora_rank={cfg.kv_lora_rank} asks for " \
            "Multi-head Latent Attention"
    if (cfg.score_function != "softmax" or cfg.num_expert_groups is not None
            or cfg.routed_scaling_factor != 1.0):
        return "its router is a plain softmax (score_function='softmax', no expert groups, " \
            "routed_scaling_factor=1)"
    mixtral, qwen2 = architecture == "MixtralForCausalLM", architecture == "Qwen2MoeForCausalLM"
    # Renormalised top-k softmax weights equal the softmax over the k chosen logits.
    renormalised = not cfg.softmax_over_all or cfg.normalize_topk
    if cfg.shared_ffn_size and not qwen2:
        return f"it has no shared expert (shared_ffn_size={cfg.shared_ffn_size})"
    if qwen2 and not (cfg.shared_ffn_size and cfg.shared_gate):
        return "it always has a gated shared expert (set shared_ffn_size > 0, shared_gate=True)"
    if cfg.qk_norm != (architecture == "Qwen3MoeForCausalLM"):
        return f"qk_norm={cfg.qk_norm} differs from its attention"
    if cfg.qkv_bias and not qwen2:
        return "it has no qkv bias (qkv_bias=True)"
    if mixtral and cfg.dense_layer_ids:
        return f"every layer is MoE, but layers {cfg.dense_layer_ids} are dense"
    if mixtral and not renormalised:
        return "it renormalises the top-k weights (softmax_over_all=True, normalize_topk=False)"
    return None


def _unsupported_deepseek(cfg: ModelConfig) -> str | None:
    if not cfg.is_mla:
        return "its attention is Multi-head Latent Attention (set kv_lora_rank and the MLA sizes)"
    if cfg.score_function != "sigmoid" or not cfg.expert_bias:
        return "its router scores are sigmoids with a correction bias (score_function=" \
            "'sigmoid', expert_bias=True)"
    if not cfg.shared_ffn_size or cfg.shared_gate or cfg.shared_ffn_size % cfg.expert_ffn_size:
        return ("it has ungated shared experts of expert_ffn_size each (shared_ffn_size a "
                f"positive multiple of {cfg.expert_ffn_size}, shared_gate=False)")
    if cfg.dense_layer_ids != tuple(range(cfg.first_k_dense)):
        return f"only its first layers are dense (first_k_dense), but {cfg.dense_layer_ids} are"
    if cfg.tie_embeddings:
        return "its output projection is not tied to the embedding (tie_embeddings=False)"
    return None


def _deepseek_config(cfg: ModelConfig) -> dict:
    groups = cfg.num_expert_groups or 1
    return dict(
        n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_ffn_size,
        n_shared_experts=cfg.shared_ffn_size // cfg.expert_ffn_size,
        first_k_dense_replace=cfg.first_k_dense, moe_layer_freq=1,
        n_group=groups, topk_group=cfg.topk_groups or 1, norm_topk_prob=cfg.normalize_topk,
        routed_scaling_factor=cfg.routed_scaling_factor, scoring_func="sigmoid",
        topk_method="noaux_tc", kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave, attention_bias=False,
        # MTP layers are not loaded, so not saved either
        num_nextn_predict_layers=0,
    )


def hf_config_from(cfg: ModelConfig, architecture: str, base: dict | None = None) -> dict:
    """The config.json (as a dict) of ``cfg`` saved as ``architecture``.

    ``base``: the config.json the model was loaded from; its keys foldmesh does not model
    (token ids, max_position_embeddings, ...) are kept.

    Raises:
        CheckpointError: ``architecture`` is unknown or cannot express ``cfg``.
    """
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"architecture={architecture!r} is not supported; use one of "
                              f"{sorted(ARCHITECTURES)}")
    why = _unsupported(cfg, architecture)
    if why is not None:
        raise CheckpointError(f"ModelConfig cannot be saved as {architecture}: {why}; pass "
                              f"another architecture (default: {infer_architecture(cfg)})")
    model_type = ARCHITECTURES[architecture]
    out = {}
    if base and architecture in (base.get("architectures") or ()):
        out = {k: base[k] for k in _PASSTHROUGH if k in base}
    out.update(
        architectures=[architecture], model_type=model_type, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
        rope_parameters=_rope_parameters(cfg),
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        num_experts_per_tok=cfg.topk,
    )
    if model_type == "mixtral":
        out.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.expert_ffn_size,
                   sliding_window=None)
        return out
    if model_type == "deepseek_v3":
        out.pop("head_dim")  # transformers derives it (qk_rope_head_dim)
        out.update(_deepseek_config(cfg))
        if cfg.ffn_size:  # else (no dense layer) the loaded config's, or a placeholder
            out["intermediate_size"] = cfg.ffn_size
        out.setdefault("intermediate_size", cfg.expert_ffn_size)
        return out
    out.update(
        num_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_ffn_size,
        decoder_sparse_step=cfg.moe_every, use_sliding_window=False,
        norm_topk_prob=not cfg.softmax_over_all or cfg.normalize_topk,
        # Layers that the sparse step alone would make MoE, but that are dense.
        mlp_only_layers=[i for i in cfg.dense_layer_ids if (i + 1) % cfg.moe_every == 0],
    )
    if cfg.ffn_size:
        out["intermediate_size"] = cfg.ffn_size
    if model_type == "qwen2_moe":
        out.update(shared_expert_intermediate_size=cfg.shared_ffn_size, qkv_bias=cfg.qkv_bias)
    else:
        out["attention_bias"] = False
    return out
