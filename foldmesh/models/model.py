"""A decoder-only MoE transformer as a plain module (no ``torch.distributed`` here).

Dimension legend: B batch, L tokens of this rank's sequence (all S on one process), H hidden,
Hq query heads, Hkv key/value heads, D head size, V vocabulary.

Built on the meta device and parallelized from outside (``foldmesh.parallelize``); then
``to_empty(device=...)`` and ``init_weights()`` give every module its own initial values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import MoE
from ..moe.experts import SwiGLU
from .config import ModelConfig
from .rope import rope


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs (norms and rotations lose too much in bf16), else the
    input's own dtype."""
    return torch.promote_types(x.dtype, torch.float32)


class RMSNorm(nn.Module):
    """RMSNorm computed in at least fp32 and cast back, as the Hugging Face families do."""

    def __init__(self, size: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(_compute_dtype(x))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA; q [B, Hq, L, D], k/v [B, Hkv, L, D] -> [B, Hq, L, D]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                          enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional qkv bias and q/k RMSNorm.

    Head counts are read from the projections' outputs, so tensor parallelism can shard the
    heads. ``core`` computes attention from q, k, v; context parallelism replaces it.
    """

    def __init__(self, cfg: ModelConfig, *, device=None, dtype=None):
        super().__init__()
        h, d = cfg.hidden_size, cfg.resolved_head_dim
        kw = dict(device=device, dtype=dtype)
        self.head_dim, self.theta, self.init_std = d, cfg.rope_theta, cfg.init_std
        self.rope_scaling = cfg.rope_scaling
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias, **kw)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, **kw)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, **kw)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False, **kw)
        self.q_norm = RMSNorm(d, cfg.norm_eps, **kw) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.norm_eps, **kw) if cfg.qk_norm else None
        self.core = causal_attention

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, std=self.init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, L, H], positions [L] -> [B, L, H]."""
        b, n = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(b, n, -1, self.head_dim)  # [B, L, Hq, D]
        k = self.k_proj(x).view(b, n, -1, self.head_dim)
        v = self.v_proj(x).view(b, n, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, D]
        q = rope(q, positions, self.theta, self.rope_scaling)
        k = rope(k, positions, self.theta, self.rope_scaling)
        out = self.core(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.o_proj(out)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``+ ffn(norm(.))`` (dense or MoE).

    ``attn`` is grouped-query ``Attention``, or ``MLAttention`` (``foldmesh.models.mla``) when
    the config sets ``kv_lora_rank``."""

    def __init__(self, cfg: ModelConfig, layer: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, **kw)
        if cfg.is_mla:
            from .mla import MLAttention  # mla.py builds on this module's RMSNorm

            self.attn = MLAttention(cfg, **kw)
        else:
            self.attn = Attention(cfg, **kw)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, **kw)
        self.is_moe = cfg.is_moe(layer)
        if self.is_moe:
            self.ffn = MoE(cfg.router_config(), cfg.moe_config(), **kw)
        else:
            self.ffn = SwiGLU(cfg.hidden_size, cfg.ffn_size, **kw)
        self.init_std = cfg.init_std

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.ffn(self.ffn_norm(x))


def part_seed(seed: int, place: int) -> int:
    """The RNG seed of the part at ``place`` (see ``Transformer.parts``) for a run's seed."""
    return (seed * 1_000_003 + place) % 2**63


class Transformer(nn.Module):
    """Token ids [B, L] int64 -> logits [B, L, V].

    ``layers`` is keyed by each block's global index (``"0"`` .. ``"L-1"``), so parameter names
    are ``layers.<i>.…`` however the model is split. A pipeline stage
    (``foldmesh.pipeline.split_model``) is a ``Transformer`` holding some of the layers, with
    ``embed`` None unless it is the first stage and ``norm``/``lm_head`` None unless it is the
    last: it then takes hidden states [B, L, H] instead of ids, or returns them instead of
    logits.
    """

    def __init__(self, cfg: ModelConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i, **kw) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, **kw)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **kw)
        self.tie_weights()

    @property
    def is_whole(self) -> bool:
        """Whether this module holds every part of the model (it is not a pipeline stage)."""
        return (self.embed is not None and self.lm_head is not None
                and len(self.layers) == self.config.num_layers)

    def tie_weights(self) -> None:
        """Share the embedding with the output projection when the config ties them (again
        after ``to_empty`` or parallelization, which replace parameters)."""
        if self.config.tie_embeddings and self.embed is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed.weight

    def parts(self) -> list[tuple[int, nn.Module]]:
        """The parts this module holds with their place in the whole model: 0 the embedding,
        1 + i layer i, L + 1 the final norm, L + 2 the output projection."""
        n = self.config.num_layers
        out = [(0, self.embed)] + [(1 + int(k), m) for k, m in self.layers.items()]
        out += [(n + 1, self.norm), (n + 2, self.lm_head)]
        return [(i, m) for i, m in out if m is not None]

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every weight (after ``to_empty``).

        Args:
            seed: when given, each part (see ``parts``) draws from the RNG seeded with
                ``part_seed(seed, place)``, so a pipeline stage gets exactly the values the
                whole model would for its parts (on the same tensor-parallel layout; for any
                layout see ``foldmesh.init_weights``). None: draw from the current RNG state,
                part after part.
        """
        for place, part in self.parts():
            if seed is not None:
                torch.manual_seed(part_seed(seed, place))
            self.init_part(part)
        self.tie_weights()

    @torch.no_grad()
    def init_part(self, part: nn.Module) -> None:
        """Initialise one of ``parts()`` from the current RNG state."""
        std = self.config.init_std
        if part is self.embed or (part is self.lm_head and not self.config.tie_embeddings):
            nn.init.normal_(part.weight, std=std)
            return
        for m in part.modules():
            if isinstance(m, SwiGLU):
                for lin in (m.gate_proj, m.up_proj, m.down_proj):
                    nn.init.normal_(lin.weight, std=std)
            elif hasattr(m, "reset_parameters") and not isinstance(m, (nn.Embedding, nn.Linear)):
                m.reset_parameters()

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: token ids [B, L] int64 (hidden states [B, L, H] when ``embed`` is None);
        positions [L] int64 (default ``arange(L)``) -> logits [B, L, V] (hidden states
        [B, L, H] when ``lm_head`` is None)."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        h = self.embed(x) if self.embed is not None else x
        for layer in self.layers.values():
            h = layer(h, positions)
        if self.lm_head is None:
            return h
        return self.lm_head(self.norm(h))
