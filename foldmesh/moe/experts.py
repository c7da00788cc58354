"""Routed experts (grouped SwiGLU) and the shared expert, as plain modules.

Dimension legend: M expert-contiguous rows, H hidden, F expert FFN size, E experts (the local
experts when the weights are shards), S shared-expert FFN size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import grouped_gemm, swiglu


class GroupedExperts(nn.Module):
    """E SwiGLU experts computed together with the grouped GEMM.

    Weights: ``w_gate`` and ``w_up`` [E, H, F], ``w_down`` [E, F, H]. Gate and up are separate
    parameters so that splitting F over etp keeps each rank's gate and up columns paired
    (a fused [E, H, 2F] parameter split on its last dim would not).
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, init_std: float = 0.02,
                 *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.init_std = init_std
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size, **kw))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size, **kw))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn_size, hidden_size, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=self.init_std)

    def forward(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """tokens [M, H] grouped by expert, counts [E] int64 rows per expert -> [M, H]."""
        return self.compute(tokens, counts, self.w_gate, self.w_up, self.w_down)

    @staticmethod
    def compute(tokens, counts, w_gate, w_up, w_down) -> torch.Tensor:
        """The expert FFN on explicit (possibly local-shard) weights; rows past
        ``counts.sum()`` give zeros. With F split over etp the result is a partial sum."""
        # Gate and up as two grouped GEMMs rather than one on torch.cat([w_gate, w_up]): the
        # GEMM saves its weight for backward, and a concatenated copy would stay alive per
        # layer and micro-batch in flight (El·H·2F elements, the largest saved tensor of a
        # Mixtral layer). The parameters themselves are kept alive anyway.
        # The tokens arrive in the compute dtype (``MoE`` casts them under autocast): each
        # weight is cast to it once per forward, and the GEMM saves that copy for backward
        # (the planner counts it). Under FSDP2's param_dtype the casts are no-ops.
        dt = tokens.dtype
        offsets = torch.cumsum(counts, 0)
        h = torch.cat([grouped_gemm(tokens, w_gate.to(dt), offsets),
                       grouped_gemm(tokens, w_up.to(dt), offsets)], dim=1)  # [M, 2F]
        return grouped_gemm(swiglu(h), w_down.to(dt), offsets)


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP: ``down(silu(gate_proj(x)) * up_proj(x))``, x [..., H] -> [..., H]."""

    def __init__(self, hidden_size: int, ffn_size: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype, bias=False)
        self.gate_proj = nn.Linear(hidden_size, ffn_size, **kw)
        self.up_proj = nn.Linear(hidden_size, ffn_size, **kw)
        self.down_proj = nn.Linear(ffn_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SharedExpert(nn.Module):
    """A dense SwiGLU MLP every token goes through, optionally scaled by a sigmoid gate
    (Qwen2-MoE): ``out = sigmoid(x @ g) * mlp(x)``.

    The MLP and the gate are separate submodules so that tensor parallelism can shard the MLP
    while the one-column gate stays on each rank's own tokens."""

    def __init__(self, hidden_size: int, ffn_size: int, gated: bool = False,
                 init_std: float = 0.02, *, device=None, dtype=None):
        super().__init__()
        self.init_std = init_std
        self.mlp = SwiGLU(hidden_size, ffn_size, device=device, dtype=dtype)
        self.gate = (nn.Linear(hidden_size, 1, bias=False, device=device, dtype=dtype)
                     if gated else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in (self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj, self.gate):
            if m is not None:
                nn.init.normal_(m.weight, std=self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        out = self.mlp(x)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out
