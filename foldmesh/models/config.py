"""The configuration of a decoder-only MoE transformer, and how it maps onto the MoE layer's.

One ``ModelConfig`` covers the families users bring (Mixtral, Qwen2-MoE, Qwen3-MoE) and the
paper's models: the differences are routing (softmax over the chosen logits or over all
experts, renormalised or not), a shared expert with or without a sigmoid gate, q/k RMSNorm,
qkv bias, and which layers are dense.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..moe import MoEConfig, RouterConfig
from .rope import Yarn


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
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not divisible by num_kv_heads="
                f"{self.num_kv_heads}; grouped-query attention needs whole groups"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size={self.hidden_size} is not divisible by num_heads="
                f"{self.num_heads}; set head_dim explicitly"
            )
        if self.resolved_head_dim % 2:
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

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def is_moe(self, layer: int) -> bool:
        return (layer >= self.first_k_dense and (layer + 1) % self.moe_every == 0
                and layer not in self.dense_layers)

    @property
    def dense_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if not self.is_moe(i))

    def tp_split_sizes(self) -> dict[str, int]:
        """The sizes tensor parallelism splits over tp (only those the model uses)."""
        sizes = {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                 "vocab_size": self.vocab_size}
        if self.dense_layer_ids:
            sizes["ffn_size"] = self.ffn_size
        if self.shared_ffn_size:
            sizes["shared_ffn_size"] = self.shared_ffn_size
        return sizes

    def router_config(self) -> RouterConfig:
        return RouterConfig(
            hidden_size=self.hidden_size, num_experts=self.num_experts, topk=self.topk,
            pre_softmax=self.softmax_over_all, normalize_topk=self.normalize_topk,
            aux_loss_coeff=self.aux_loss_coeff, z_loss_coeff=self.z_loss_coeff,
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
