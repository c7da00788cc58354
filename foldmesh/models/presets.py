"""Named model sizes: the paper's four models, public checkpoints' shapes, and debug sizes.

The DeepSeek-V3 family's sizes are those of each checkpoint's Hugging Face config.json
(cited at each preset). The presets use the Hub checkpoint's layout (``rope_interleave``:
DeepSeek's checkpoints rotate interleaved pairs) and leave out its multi-token-prediction
module (``num_nextn_predict_layers``), which foldmesh does not model yet. The values were
read from copies of those files (Hub mirrors, converters' tests) that agree with each other;
two rest on secondary copies only: Kimi K2's ``rms_norm_eps`` 1e-6 and DeepSeek-V2-Lite's
YaRN ``mscale`` = ``mscale_all_dim`` = 0.707.

The paper's models (MoE Parallel Folding, Table 2): Mixtral-8x22B, Qwen2-57B-A14B,
Mixtral-8x22B-G8T8 (64 experts, top-8, each 1/8 of the FFN: fine-grained) and Llama3-8x70B
(Llama-3-70B upcycled to 8 experts, top-2).
"""

from __future__ import annotations

from dataclasses import replace

from .config import ModelConfig
from .rope import Yarn

# DeepSeek-V3 family: Multi-head Latent Attention with DeepSeek-V2/V3's head sizes (all four
# checkpoints: kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128)
_MLA = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            rope_interleave=True)
# sigmoid scores + correction bias ("scoring_func": "sigmoid", "topk_method": "noaux_tc"),
# weights renormalised ("norm_topk_prob": true)
_NOAUX = dict(score_function="sigmoid", expert_bias=True, normalize_topk=True)

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
    # huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (DeepSeek-R1 has the same
    # architecture): 61 layers, the first 3 dense; 256 experts in 8 groups, 4 kept, top 8;
    # YaRN 40x over 4096 with mscale = mscale_all_dim = 1.
    "deepseek-v3": ModelConfig(
        vocab_size=129280, hidden_size=7168, num_layers=61, num_heads=128, num_kv_heads=128,
        ffn_size=18432, first_k_dense=3, num_experts=256, topk=8, expert_ffn_size=2048,
        shared_ffn_size=2048, num_expert_groups=8, topk_groups=4, routed_scaling_factor=2.5,
        q_lora_rank=1536, **_MLA, **_NOAUX, rope_theta=1e4, norm_eps=1e-6,
        rope_scaling=Yarn(factor=40.0, original_max_position=4096, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    ),
    # huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json (model_type
    # deepseek_v2): plain query, softmax over all 64 experts ("topk_method": "greedy"),
    # top 6 not renormalised, 2 shared experts; YaRN 40x with mscale = mscale_all_dim = 0.707.
    "deepseek-v2-lite": ModelConfig(
        vocab_size=102400, hidden_size=2048, num_layers=27, num_heads=16, num_kv_heads=16,
        ffn_size=10944, first_k_dense=1, num_experts=64, topk=6, expert_ffn_size=1408,
        shared_ffn_size=2 * 1408, softmax_over_all=True, **_MLA, rope_theta=1e4,
        norm_eps=1e-6,
        rope_scaling=Yarn(factor=40.0, original_max_position=4096, beta_fast=32.0,
                          beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
    ),
    # huggingface.co/moonshotai/Moonlight-16B-A3B/blob/main/config.json (DeepseekV3ForCausalLM):
    # plain query, 64 experts in one group, top 6, 2 shared experts, no RoPE scaling.
    "moonlight-16b-a3b": ModelConfig(
        vocab_size=163840, hidden_size=2048, num_layers=27, num_heads=16, num_kv_heads=16,
        ffn_size=11264, first_k_dense=1, num_experts=64, topk=6, expert_ffn_size=1408,
        shared_ffn_size=2 * 1408, routed_scaling_factor=2.446, **_MLA, **_NOAUX,
        rope_theta=5e4, norm_eps=1e-5,
    ),
    # huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/config.json (model_type kimi_k2,
    # DeepseekV3ForCausalLM): 64 heads, 384 experts in one group, top 8, the first layer
    # dense; YaRN 32x over 4096 with beta_fast = beta_slow = 1.
    "kimi-k2": ModelConfig(
        vocab_size=163840, hidden_size=7168, num_layers=61, num_heads=64, num_kv_heads=64,
        ffn_size=18432, first_k_dense=1, num_experts=384, topk=8, expert_ffn_size=2048,
        shared_ffn_size=2048, routed_scaling_factor=2.827, q_lora_rank=1536, **_MLA,
        **_NOAUX, rope_theta=5e4, norm_eps=1e-6,
        rope_scaling=Yarn(factor=32.0, original_max_position=4096, beta_fast=1.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
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
    # low-rank query, interleaved RoPE, a dense first layer, 2 shared experts' worth, 8
    # experts in 4 groups (2 kept) with sigmoid scores and a correction bias, YaRN with
    # DeepSeek's two magnitudes (a blended pair range in qk_rope_head_dim 4)
    "debug-deepseek": ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=4,
        ffn_size=48, first_k_dense=1, num_experts=8, topk=2, expert_ffn_size=8,
        shared_ffn_size=16, num_expert_groups=4, topk_groups=2, routed_scaling_factor=2.5,
        q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=6, rope_interleave=True, **_NOAUX, rope_theta=100.0,
        rope_scaling=Yarn(factor=4.0, original_max_position=64, beta_fast=8.0, beta_slow=0.5,
                          mscale=1.0, mscale_all_dim=0.8),
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
