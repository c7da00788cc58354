"""Which Hugging Face tensors hold each foldmesh parameter, and in which layout.

Dimension legend: V vocabulary, H hidden, E experts, F expert FFN size.

Hub checkpoints of the four families store every routed expert as its own ``nn.Linear``
weights ([F, H] for gate and up, [H, F] for down). foldmesh stacks them into
``w_gate``/``w_up`` [E, H, F] and ``w_down`` [E, F, H]: expert e's slice is the transpose of
its Hub tensor. Every other parameter is one Hub tensor with the same layout, and so is one
buffer: DeepSeek-V3's expert-score correction bias (``router.expert_bias`` <->
``mlp.gate.e_score_correction_bias``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..models import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint or config that foldmesh cannot read or write; the message says which
    tensor or setting, and what to change."""


ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
"""Supported ``architectures`` entry of config.json -> its ``model_type``."""

# Wrappers that insert a module level without changing the model: activation checkpointing,
# torch.compile, FSDP1.
_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")

# Non-persistent buffers that older transformers versions wrote into checkpoints.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Tensor:
    """The parameter is the Hub tensor ``name``, same shape and layout."""

    name: str

    def hf_names(self) -> list[str]:
        return [self.name]

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The Hub tensor's shape, given the (global) shape of the foldmesh parameter."""
        return tuple(shape)


@dataclass(frozen=True)
class PerExpert:
    """The parameter [E, a, b] stacks E Hub tensors [b, a]: ``pattern.format(e=e)``, transposed."""

    pattern: str
    num_experts: int

    def hf_names(self) -> list[str]:
        return [self.pattern.format(e=e) for e in range(self.num_experts)]

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[2], shape[1])


Source = Tensor | PerExpert


def canonical(name: str) -> str:
    """A parameter name of a (possibly wrapped) Transformer, without the wrappers' levels."""
    return _WRAPPERS.sub("", name)


def ignored(hf_name: str) -> bool:
    """Whether a checkpoint tensor that no parameter reads is harmless (a stale buffer)."""
    return bool(_IGNORED.search(hf_name))


_MLA = {"q_proj": "q_proj", "q_a_proj": "q_a_proj", "q_a_norm": "q_a_layernorm",
        "q_b_proj": "q_b_proj", "kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm",
        "kv_b_proj": "kv_b_proj", "o_proj": "o_proj"}
"""``MLAttention`` submodule -> its name under the Hub's ``self_attn``."""


def _mla(cfg: ModelConfig, i: int) -> dict[str, Source]:
    fm, hf = f"layers.{i}.attn", f"model.layers.{i}.self_attn"
    query = ["q_proj"] if cfg.q_lora_rank is None else ["q_a_proj", "q_a_norm", "q_b_proj"]
    return {f"{fm}.{ours}.weight": Tensor(f"{hf}.{_MLA[ours]}.weight")
            for ours in [*query, "kv_a_proj", "kv_a_norm", "kv_b_proj", "o_proj"]}


def _attention(cfg: ModelConfig, i: int) -> dict[str, Source]:
    if cfg.is_mla:
        return _mla(cfg, i)
    fm, hf = f"layers.{i}.attn", f"model.layers.{i}.self_attn"
    out: dict[str, Source] = {}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out[f"{fm}.{proj}.weight"] = Tensor(f"{hf}.{proj}.weight")
        if cfg.qkv_bias and proj != "o_proj":
            out[f"{fm}.{proj}.bias"] = Tensor(f"{hf}.{proj}.bias")
    if cfg.qk_norm:
        out[f"{fm}.q_norm.weight"] = Tensor(f"{hf}.q_norm.weight")
        out[f"{fm}.k_norm.weight"] = Tensor(f"{hf}.k_norm.weight")
    return out


def _mlp(fm: str, hf: str) -> dict[str, Source]:
    """A SwiGLU MLP whose projections keep their names on both sides."""
    return {f"{fm}.{p}.weight": Tensor(f"{hf}.{p}.weight")
            for p in ("gate_proj", "up_proj", "down_proj")}


def _moe(cfg: ModelConfig, i: int, model_type: str) -> dict[str, Source]:
    fm = f"layers.{i}.ffn"
    e = cfg.num_experts
    if model_type == "mixtral":
        hf = f"model.layers.{i}.block_sparse_moe"
        experts = {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}
    else:
        hf = f"model.layers.{i}.mlp"
        experts = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
    out: dict[str, Source] = {f"{fm}.router.weight": Tensor(f"{hf}.gate.weight")}
    if model_type == "deepseek_v3":
        out[f"{fm}.router.expert_bias"] = Tensor(f"{hf}.gate.e_score_correction_bias")
    for w, proj in experts.items():
        out[f"{fm}.experts.{w}"] = PerExpert(f"{hf}.experts.{{e}}.{proj}.weight", e)
    if cfg.shared_ffn_size:
        shared = "shared_experts" if model_type == "deepseek_v3" else "shared_expert"
        out.update(_mlp(f"{fm}.shared_expert.mlp", f"{hf}.{shared}"))
        if cfg.shared_gate:
            out[f"{fm}.shared_expert.gate.weight"] = Tensor(f"{hf}.shared_expert_gate.weight")
    return out


def tensor_map(cfg: ModelConfig, architecture: str) -> dict[str, Source]:
    """foldmesh parameter name (``canonical``) -> its Hub tensors, for every parameter of a
    ``Transformer(cfg)`` saved as ``architecture`` (and DeepSeek-V3's one checkpointed
    buffer, ``layers.<i>.ffn.router.expert_bias``). A tied ``lm_head.weight`` is the
    embedding and has no entry."""
    model_type = ARCHITECTURES[architecture]
    out: dict[str, Source] = {"embed.weight": Tensor("model.embed_tokens.weight")}
    for i in range(cfg.num_layers):
        out[f"layers.{i}.attn_norm.weight"] = Tensor(f"model.layers.{i}.input_layernorm.weight")
        out.update(_attention(cfg, i))
        out[f"layers.{i}.ffn_norm.weight"] = Tensor(
            f"model.layers.{i}.post_attention_layernorm.weight")
        if cfg.is_moe(i):
            out.update(_moe(cfg, i, model_type))
        else:
            out.update(_mlp(f"layers.{i}.ffn", f"model.layers.{i}.mlp"))
    out["norm.weight"] = Tensor("model.norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = Tensor("lm_head.weight")
    return out


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def mtp_layer(hf_name: str, cfg: ModelConfig, architecture: str, hf_config: dict) -> bool:
    """Whether ``hf_name`` belongs to a DeepSeek-V3 multi-token-prediction module: the layers
    ``num_hidden_layers`` .. ``num_hidden_layers + num_nextn_predict_layers - 1`` that
    config.json declares. foldmesh does not load them yet (MTP is a later addition); any
    other layer beyond the model stays an error."""
    if ARCHITECTURES.get(architecture) != "deepseek_v3":
        return False
    m = _LAYER.match(hf_name)
    extra = int(hf_config.get("num_nextn_predict_layers") or 0)
    return m is not None and cfg.num_layers <= int(m.group(1)) < cfg.num_layers + extra
