"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi K2, Moonlight) as a plain module.

Dimension legend: B batch, L tokens of this rank's sequence (all S on one process), H hidden,
Hq heads, Dn = ``qk_nope_head_dim``, Dr = ``qk_rope_head_dim``, Dv = ``v_head_dim``,
Rq = ``q_lora_rank``, Rkv = ``kv_lora_rank``.

Per token, the keys and values of every head are expanded from one compressed latent
c [Rkv] (plus one rotated key [Dr] that all heads share, the "decoupled RoPE key"):

    q        = q_b_proj(q_a_norm(q_a_proj(x)))   or q_proj(x)        [Hq, Dn + Dr]
    c, k_rot = kv_a_proj(x)                                           [Rkv], [Dr]
    k_nope, v = kv_b_proj(kv_a_norm(c))                               [Hq, Dn], [Hq, Dv]
    k        = [k_nope, rope(k_rot) for every head]                   [Hq, Dn + Dr]
    q's last Dr dims are rotated too; out = o_proj(attention(q, k, v)) [H]

Like ``Attention``, head counts are read from the projections' outputs (tensor parallelism
splits the heads) and ``core`` computes causal attention from q, k, v; here v's head size Dv
may differ from q's and k's, which SDPA allows. The softmax scale differs from SDPA's
default (Dn + Dr)^-0.5 only by YaRN's factor (``ModelConfig.softmax_scale``), which is folded
into q, so a replacement ``core`` keeps ``causal_attention``'s signature.

``kv_exchange`` (None on one process) is where context parallelism hands every position's
keys to a rank that holds only some of the queries: it maps this rank's normalised latent
and rotated key [B, L, Rkv], [B, 1, L, Dr] to those of all S positions in natural order,
which ``kv_b_proj`` then expands locally (``foldmesh._context_parallel.LatentExchange``);
the ``core`` that comes with it takes q of L positions and k, v of S.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .model import RMSNorm, causal_attention
from .rope import rope

LATENT_NORM_EPS = 1e-6
"""Epsilon of the two latent RMSNorms: DeepSeek's code and transformers build them with the
RMSNorm default whatever ``rms_norm_eps`` says (Moonlight's 1e-5 applies to the others)."""


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., D] with pairs (x0, x1), (x2, x3), ... -> [..., D] with pairs (x_i, x_{i+D/2}).

    Rotating interleaved pairs equals rotating half-split pairs after this permutation, and
    q and k get the same permutation, so q·k is unchanged (transformers'
    ``apply_rotary_pos_emb_interleave`` returns the same layout)."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class MLAttention(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE (see the module docstring).

    Submodules (Hugging Face ``self_attn`` names in brackets): ``q_proj`` [q_proj] when
    ``q_lora_rank`` is None, else ``q_a_proj`` [q_a_proj], ``q_a_norm`` [q_a_layernorm],
    ``q_b_proj`` [q_b_proj]; ``kv_a_proj`` [kv_a_proj_with_mqa], ``kv_a_norm``
    [kv_a_layernorm], ``kv_b_proj`` [kv_b_proj], ``o_proj`` [o_proj]. No biases.
    """

    def __init__(self, cfg: ModelConfig, *, device=None, dtype=None):
        super().__init__()
        h, n = cfg.hidden_size, cfg.num_heads
        kw = dict(device=device, dtype=dtype)
        self.nope, self.rot, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, \
            cfg.v_head_dim
        self.qk_dim = self.nope + self.rot
        self.latent = cfg.kv_lora_rank
        self.theta, self.rope_scaling, self.init_std = cfg.rope_theta, cfg.rope_scaling, \
            cfg.init_std
        self.interleave = cfg.rope_interleave
        # SDPA scales by qk_dim^-0.5 itself; the rest of DeepSeek's scale goes onto q
        self.q_scale = cfg.softmax_scale() * self.qk_dim ** 0.5
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, n * self.qk_dim, bias=False, **kw)
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False, **kw)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, **kw)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, n * self.qk_dim, bias=False, **kw)
        self.kv_a_proj = nn.Linear(h, self.latent + self.rot, bias=False, **kw)
        self.kv_a_norm = RMSNorm(self.latent, LATENT_NORM_EPS, **kw)
        self.kv_b_proj = nn.Linear(self.latent, n * (self.nope + self.v_dim), bias=False, **kw)
        self.o_proj = nn.Linear(n * self.v_dim, h, bias=False, **kw)
        self.core = causal_attention
        self.kv_exchange = None

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.q_a_proj, self.q_b_proj, self.kv_a_proj, self.kv_b_proj,
                    self.o_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, std=self.init_std)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.interleave:
            x = deinterleave(x)
        return rope(x, positions, self.theta, self.rope_scaling)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, L, H], positions [L] -> [B, L, H]."""
        b, n = x.shape[0], x.shape[1]
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(b, n, -1, self.qk_dim).transpose(1, 2)  # [B, Hq, L, Dn + Dr]
        q_nope, q_rot = q.split([self.nope, self.rot], dim=-1)
        c, k_rot = self.kv_a_proj(x).split([self.latent, self.rot], dim=-1)  # [B, L, Rkv|Dr]
        c = self.kv_a_norm(c)
        k_rot = self._rope(k_rot.unsqueeze(1), positions)  # [B, 1, L, Dr], one shared head
        if self.kv_exchange is not None:  # every position's latent: [B, S, Rkv], [B, 1, S, Dr]
            c, k_rot = self.kv_exchange(c, k_rot)
        kv = self.kv_b_proj(c).view(b, c.shape[1], -1, self.nope + self.v_dim)
        k_nope, v = kv.transpose(1, 2).split([self.nope, self.v_dim], dim=-1)  # [B, Hq, S, .]
        q_rot = self._rope(q_rot, positions)
        q = torch.cat([q_nope, q_rot], dim=-1)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        k = torch.cat([k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        out = self.core(q, k, v).transpose(1, 2).reshape(b, n, -1)  # [B, L, Hq·Dv]
        return self.o_proj(out)
