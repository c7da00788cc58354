"""Model FLOPs per token and MFU, counted as the paper counts them.

Training FLOPs per token = 6 · N_active + 3 · L · S · Hq · (D + Dv), where

- N_active: parameters a token's matmuls use — attention projections, dense MLPs, the shared
  expert, the router and only the k routed experts it is sent to (not all E), plus the output
  projection; the embedding lookup is not a matmul and is not counted;
- 6 = 2 FLOPs per multiply-add × (forward + backward, which costs twice the forward);
- the second term is attention itself: Q·Kᵀ costs 2·S·D and A·V 2·S·Dv FLOPs per head and
  token in the forward (Dv = D except under MLA, whose v heads are smaller), halved by the
  causal mask, times 3 for forward and backward.

MFU = achieved model FLOPs per second per GPU / the GPU's peak dense BF16 rate.
"""

from __future__ import annotations

import torch

from ..models import ModelConfig

# GPUs whose device name differs from the planner preset with their compute
_SAME_COMPUTE = {"H800": "h100"}


def active_matmul_params(cfg: ModelConfig) -> int:
    """N_active above."""
    embedding = cfg.vocab_size * cfg.hidden_size
    total = cfg.num_params(active=True)
    if not cfg.tie_embeddings:
        return total - embedding  # keep the output projection, drop the lookup table
    return total  # tied: the one matrix is used as the output projection


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token (module docstring). ``causal=False`` counts the attention
    matrix in full, as Megatron-Core's formula (and so MoE Parallel Folding's MFU) does."""
    # Q·Kᵀ over the qk head size, A·V over the v head size (they differ under MLA)
    d_v = cfg.v_head_dim if cfg.is_mla else cfg.resolved_head_dim
    attention = 3 * cfg.num_layers * seq_len * cfg.num_heads * (cfg.resolved_head_dim + d_v)
    return 6 * active_matmul_params(cfg) + attention * (1 if causal else 2)


def peak_flops(device: torch.device) -> float | None:
    """Peak dense BF16 FLOP/s of one ``device``; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    # one table of peak rates, the planner's presets (with their sources); imported here,
    # not at the top, because foldmesh.plan itself imports this module
    from ..plan._hardware import HARDWARE

    name = torch.cuda.get_device_name(device).upper()
    keys = {**{k.upper(): k for k in HARDWARE}, **_SAME_COMPUTE}
    for key, preset in keys.items():
        if key in name:
            return HARDWARE[preset].peak_flops
    return None
