"""Named model sizes: the paper's four models, public checkpoints' shapes, and debug sizes.

The paper's models (MoE Parallel Folding, Table 2): Mixtral-8x22B, Qwen2-57B-A14B,
Mixtral-8x22B-G8T8 (64 experts, top-8, each 1/8 of the FFN: fine-grained) and Llama3-8x70B
(Llama-3-70B upcycled to 8 experts, top-2).
"""

from __future__ import annotations

from dataclasses import replace

from .config import ModelConfig

_MIXTRAL_8X22B = ModelConfig(
    vocab_size=32768, hidden_size=6144, num_layers=56, num_heads=48, num_kv_heads=8,
    num_experts=8, topk=2, expert_ffn_size=16384, rope_theta=1e6, norm_eps=1e-5,
)

PRESETS: dict[str, ModelConfig] = {
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        num_experts=8, topk=2, expert_ffn_size=14336, rope_theta=1e6, norm_eps=1e-5,
    ),
    "mixtral-8x22b": _MIXTRAL_8X22B,
    "mixtral-8x22b-g8t8": replace(_MIXTRAL_8X22B, num_experts=64, topk=8,
                                  expert_ffn_size=16384 // 8),
    "llama3-8x70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
        num_experts=8, topk=2, expert_ffn_size=28672, rope_theta=5e5, norm_eps=1e-5,
    ),
    "qwen2-57b-a14b": ModelConfig(
        vocab_size=151936, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
        num_experts=64, topk=8, expert_ffn_size=2560, shared_ffn_size=20480,
        shared_gate=True, softmax_over_all=True, qkv_bias=True, rope_theta=1e6,
    ),
    "qwen3-30b-a3b": ModelConfig(
        vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
        head_dim=128, num_experts=128, topk=8, expert_ffn_size=768, softmax_over_all=True,
        normalize_topk=True, qk_norm=True, rope_theta=1e6,
    ),
    # Small sizes for CPU tests and the demo: every feature of their family, tiny.
    "debug-mixtral": ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        num_experts=8, topk=2, expert_ffn_size=16, rope_theta=1e6, norm_eps=1e-5,
    ),
    "debug-qwen2": ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
        num_experts=8, topk=2, expert_ffn_size=8, shared_ffn_size=16, shared_gate=True,
        softmax_over_all=True, qkv_bias=True, ffn_size=48, first_k_dense=1,
    ),
    "debug-qwen3": ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        num_experts=8, topk=2, expert_ffn_size=8, softmax_over_all=True,
        normalize_topk=True, qk_norm=True, tie_embeddings=True,
    ),
    "demo": ModelConfig(
        vocab_size=256, hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=4,
        num_experts=8, topk=2, expert_ffn_size=128, rope_theta=1e4, norm_eps=1e-5,
        aux_loss_coeff=1e-2,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The named config, with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
