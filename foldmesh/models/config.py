"""The configuration of a decoder-only MoE transformer, and how it maps onto the MoE layer's.

One ``ModelConfig`` covers the families users bring (Mixtral, Qwen2-MoE, Qwen3-MoE, the
DeepSeek-V3 family: DeepSeek-V3/R1, Kimi K2, Moonlight, DeepSeek-V2-Lite) and the paper's
models: the differences are routing (softmax over the chosen logits or over all experts,
renormalised or not; or sigmoid scores, group-limited, with a correction bias and a scale),
a shared expert with or without a sigmoid gate, q/k RMSNorm, qkv bias, which layers are
dense, and the attention: grouped-query, or Multi-head Latent Attention when
``kv_lora_rank`` is set (``foldmesh.models.mla``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..moe import MoEConfig, RouterConfig
from .rope import Yarn, yarn_magnitude

SCORE_FUNCTIONS = ("softmax", "sigmoid")
_MLA_SIZES = ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclass(frozen=True)
class ModelConfig:
    """Settings of a decoder-only MoE transformer. Validated on construction."""

    vocab_size: int
    """V, tokens in the vocabulary."""
    hidden_size: int
    """H, model width."""
    num_layers: int
    """Transformer blocks."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention); divides ``num_heads``."""
    head_dim: int | None = None
    """D, size of one head; None = hidden_size // num_heads."""
    ffn_size: int = 0
    """FFN size of the dense layers (unused when every layer is MoE)."""
    num_experts: int = 8
    """E, routed experts per MoE layer."""
    topk: int = 2
    """k, experts per token."""
    expert_ffn_size: int = 0
    """F, FFN size of each routed expert."""
    shared_ffn_size: int = 0
    """FFN size of the shared expert; 0 = none."""
    shared_gate: bool = False
    """Scale the shared expert by a sigmoid gate (Qwen2-MoE)."""
    softmax_over_all: bool = False
    """False (Mixtral): softmax over the k chosen logits. True (Qwen): softmax over all E,
    then the top k probabilities."""
    normalize_topk: bool = False
    """Renormalise the k routing weights to sum to 1 (Qwen3-MoE's ``norm_topk_prob``)."""
    score_function: str = "softmax"
    """Router scores: "softmax" (see ``softmax_over_all``) or "sigmoid" (DeepSeek-V3's
    ``scoring_func``: per-expert sigmoid, weights are the chosen sigmoids)."""
    num_expert_groups: int | None = None
    """Group-limited routing (DeepSeek's ``n_group``): the E experts form this many contiguous
    groups and a token chooses only among the ``topk_groups`` best groups. None: off."""
    topk_groups: int | None = None
    """Groups kept per token (DeepSeek's ``topk_group``); set with ``num_expert_groups``. A
    group is scored by the sum of its 2 best selection scores with sigmoid and
    ``expert_bias`` (DeepSeek-V3), else by its best one (DeepSeek-V2)."""
    expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert fp32 bias added to the scores when choosing the
    top k only (DeepSeek-V3's ``e_score_correction_bias``; a router buffer, loaded and saved
    with Hugging Face checkpoints)."""
    routed_scaling_factor: float = 1.0
    """Multiplies the k routing weights, after ``normalize_topk`` (DeepSeek-V3: 2.5)."""
    first_k_dense: int = 0
    """The first k layers use a dense FFN."""
    moe_every: int = 1
    """Layer i (after the first k) is MoE when (i + 1) % moe_every == 0, else dense."""
    dense_layers: tuple[int, ...] = ()
    """Further layers forced dense (Qwen's ``mlp_only_layers``)."""
    qkv_bias: bool = False
    """Bias on the q, k, v projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each head of q and k before RoPE (Qwen3)."""
    kv_lora_rank: int | None = None
    """Multi-head Latent Attention (DeepSeek-V2/V3) when set: keys and values come from one
    compressed latent of this size per token (``foldmesh.models.mla``). None: grouped-query
    attention, and the other MLA sizes below must stay None."""
    q_lora_rank: int | None = None
    """MLA only: rank of the low-rank query (down-projection, RMSNorm, up-projection); None:
    one plain query projection (DeepSeek-V2-Lite, Moonlight)."""
    qk_nope_head_dim: int | None = None
    """MLA only: per-head size of the query/key part without position (from the latent)."""
    qk_rope_head_dim: int | None = None
    """MLA only: per-head size of the rotated query/key part; the key's is one head shared by
    all heads (the decoupled RoPE key). Even."""
    v_head_dim: int | None = None
    """MLA only: per-head size of the values (may differ from qk_nope + qk_rope)."""
    rope_interleave: bool = False
    """MLA only: RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... of the rotated part,
    as DeepSeek's checkpoints lay them out (transformers' ``rope_interleave``); False: the
    half-split pairs (x_i, x_{i+D/2})."""
    rope_theta: float = 10000.0
    rope_scaling: Yarn | None = None
    """YaRN context extension of RoPE (``foldmesh.models.rope.Yarn``; a dict of its fields
    is accepted, as TOML gives it), or None for plain RoPE."""
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    """Use the embedding matrix as the output projection."""
    capacity_factor: float | None = None
    """None: dropless MoE. Otherwise the per-rank expert capacity factor."""
    pad_to_capacity: bool = False
    """With a capacity: pad every expert to exactly its capacity (static shapes and no host
    synchronisation in the all-to-all dispatcher; the same numbers as without padding)."""
    aux_loss_coeff: float = 0.0
    """Load-balancing loss coefficient (0 = off)."""
    z_loss_coeff: float = 0.0
    """Router z-loss coefficient (0 = off)."""
    router_dtype: str = "fp32"
    """Precision of the router's logits and scores: "fp32" or "fp64"."""
    init_std: float = 0.02
    """Standard deviation of the normal init of every weight."""

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", Yarn(**self.rope_scaling))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "num_experts", "topk", "moe_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        self._check_mla()
        self._check_routing()
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not divisible by num_kv_heads="
                f"{self.num_kv_heads}; grouped-query attention needs whole groups"
            )
        if not self.is_mla and self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size={self.hidden_size} is not divisible by num_heads="
                f"{self.num_heads}; set head_dim explicitly"
            )
        if not self.is_mla and self.resolved_head_dim % 2:
            raise ValueError(f"ModelConfig head_dim={self.resolved_head_dim} must be even "
                             "(RoPE rotates pairs)")
        if any(self.is_moe(i) for i in range(self.num_layers)) and self.expert_ffn_size <= 0:
            raise ValueError("ModelConfig.expert_ffn_size must be > 0 when a layer is MoE")
        if any(not self.is_moe(i) for i in range(self.num_layers)) and self.ffn_size <= 0:
            raise ValueError("ModelConfig.ffn_size must be > 0 when a layer is dense "
                             f"(dense layers: {self.dense_layer_ids})")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError("ModelConfig.pad_to_capacity needs a capacity: set "
                             "capacity_factor (e.g. 1.0) or pad_to_capacity=False")
        self.router_config()  # validates topk against num_experts

    def _check_mla(self) -> None:
        given = [n for n in _MLA_SIZES if getattr(self, n) is not None]
        if self.rope_interleave:
            given.append("rope_interleave")
        if not self.is_mla:
            if given:
                raise ValueError(
                    f"ModelConfig.{', '.join(given)} are Multi-head Latent Attention settings "
                    "but kv_lora_rank is None; set kv_lora_rank (e.g. 512) for MLA, or drop "
                    "them for grouped-query attention")
            return
        for name in ("kv_lora_rank", *_MLA_SIZES):
            v = getattr(self, name)
            if name == "q_lora_rank" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int with "
                                 f"Multi-head Latent Attention (kv_lora_rank is set), got {v!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"ModelConfig.qk_rope_head_dim={self.qk_rope_head_dim} must be "
                             "even (RoPE rotates pairs)")
        if self.num_kv_heads != self.num_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads} differs from num_heads="
                f"{self.num_heads}: Multi-head Latent Attention expands the latent into keys "
                "and values for every head; set num_kv_heads = num_heads")
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.head_dim is not None and self.head_dim != qk:
            raise ValueError(
                f"ModelConfig.head_dim={self.head_dim} differs from qk_nope_head_dim + "
                f"qk_rope_head_dim = {qk}: with Multi-head Latent Attention leave head_dim None")
        if self.qk_norm or self.qkv_bias:
            raise ValueError("ModelConfig.qk_norm and qkv_bias are grouped-query attention "
                             "settings; Multi-head Latent Attention (kv_lora_rank set) has "
                             "neither: set them False")

    def _check_routing(self) -> None:
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"ModelConfig.score_function={self.score_function!r} is unknown; "
                             f"use one of {SCORE_FUNCTIONS}")
        g, tg, e = self.num_expert_groups, self.topk_groups, self.num_experts
        if (g is None) != (tg is None):
            raise ValueError(f"ModelConfig.num_expert_groups={g} and topk_groups={tg}: set "
                             "both for group-limited routing, or neither")
        if g is not None and (not isinstance(g, int) or g <= 0 or e % g):
            raise ValueError(f"ModelConfig.num_expert_groups={g} must divide num_experts={e}; "
                             f"pick a divisor of {e}")
        if g is not None and not (isinstance(tg, int) and 0 < tg <= g):
            raise ValueError(f"ModelConfig.topk_groups={tg} must be in 1..num_expert_groups="
                             f"{g}; lower topk_groups")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"ModelConfig.routed_scaling_factor must be > 0, got "
                             f"{self.routed_scaling_factor}")

    @property
    def is_mla(self) -> bool:
        """Whether attention is Multi-head Latent Attention (``kv_lora_rank`` is set)."""
        return self.kv_lora_rank is not None

    @property
    def resolved_head_dim(self) -> int:
        """D, the query/key head size (qk_nope + qk_rope with MLA)."""
        if self.is_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def softmax_scale(self) -> float:
        """The factor on the attention logits q·k: D^-0.5, and with MLA and YaRN's
        ``mscale_all_dim`` times yarn_magnitude(factor, mscale_all_dim)^2 (DeepSeek's
        softmax scale: the magnitude scales the position-free q/k parts too)."""
        scale = self.resolved_head_dim ** -0.5
        y = self.rope_scaling
        if self.is_mla and y is not None and y.mscale_all_dim:
            scale *= yarn_magnitude(y.factor, y.mscale_all_dim) ** 2
        return scale

    def is_moe(self, layer: int) -> bool:
        return (layer >= self.first_k_dense and (layer + 1) % self.moe_every == 0
                and layer not in self.dense_layers)

    @property
    def dense_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if not self.is_moe(i))

    def tp_split_sizes(self) -> dict[str, int]:
        """The sizes tensor parallelism splits over tp (only those the model uses)."""
        sizes = {"num_heads": self.num_heads, "vocab_size": self.vocab_size}
        if not self.is_mla:  # MLA has no separate key/value heads (they equal num_heads)
            sizes["num_kv_heads"] = self.num_kv_heads
        if self.dense_layer_ids:
            sizes["ffn_size"] = self.ffn_size
        if self.shared_ffn_size:
            sizes["shared_ffn_size"] = self.shared_ffn_size
        return sizes

    def router_config(self) -> RouterConfig:
        return RouterConfig(
            hidden_size=self.hidden_size, num_experts=self.num_experts, topk=self.topk,
            score_function=self.score_function, pre_softmax=self.softmax_over_all,
            normalize_topk=self.normalize_topk, scaling_factor=self.routed_scaling_factor,
            num_groups=self.num_expert_groups, topk_groups=self.topk_groups,
            expert_bias=self.expert_bias, aux_loss_coeff=self.aux_loss_coeff,
            z_loss_coeff=self.z_loss_coeff,
            init_std=self.init_std, router_dtype=self.router_dtype,
        )

    def moe_config(self) -> MoEConfig:
        return MoEConfig(
            ffn_size=self.expert_ffn_size, capacity_factor=self.capacity_factor,
            pad_to_capacity=self.pad_to_capacity,
            shared_ffn_size=self.shared_ffn_size, shared_gate=self.shared_gate,
            init_std=self.init_std,
        )

    def num_params(self, active: bool = False) -> int:
        """Parameter count; ``active``: only the k routed experts a token uses (plus all
        dense parts), as MFU counts them."""
        h, d, v = self.hidden_size, self.resolved_head_dim, self.vocab_size
        if self.is_mla:
            attn = self._mla_params()
        else:
            attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        experts = self.topk if active else self.num_experts
        moe = (experts * 3 * h * self.expert_ffn_size + 3 * h * self.shared_ffn_size
               + self.num_experts * h + (h if self.shared_gate else 0))
        dense = 3 * h * self.ffn_size
        total = v * h * (1 if self.tie_embeddings else 2) + h
        for i in range(self.num_layers):
            total += attn + 2 * h + (moe if self.is_moe(i) else dense)
        return total

    def _mla_params(self) -> int:
        """Parameters of one Multi-head Latent Attention layer, its two latent norms included."""
        h, n, r = self.hidden_size, self.num_heads, self.kv_lora_rank
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = (h * n * qk if self.q_lora_rank is None
             else self.q_lora_rank * (h + 1 + n * qk))
        kv = h * (r + self.qk_rope_head_dim) + r + r * n * (self.qk_nope_head_dim
                                                              + self.v_head_dim)
        return q + kv + n * self.v_head_dim * h
