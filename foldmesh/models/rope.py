"""Rotary position embedding, plain or with YaRN's context extension.

Dimension legend: B batch, heads, L positions, D head size (rotated as D/2 pairs).

YaRN (Peng et al., 2023, "YaRN: Efficient Context Window Extension of Large Language
Models", arXiv 2309.00071) rescales each pair's frequency by how many full turns it makes
over the context the model was trained on, ``original_max_position``: pairs that turn more
than ``beta_fast`` times keep their frequency (they already resolve short distances), pairs
that turn fewer than ``beta_slow`` times are slowed down by ``factor`` (interpolation, so the
longer context maps into angles they have seen), and the pairs between blend linearly. The
cos and sin are multiplied by a magnitude (the paper's ``sqrt(1/t)``, 0.1·ln(factor) + 1),
which scales every attention logit by its square. DeepSeek-V2/V3 and Kimi K2 write it as
the ratio of two such terms (``mscale``, ``mscale_all_dim``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def yarn_magnitude(factor: float, mscale: float = 1.0) -> float:
    """0.1·mscale·ln(factor) + 1 for a context stretched ``factor`` times (1 when not)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling (Hugging Face ``rope_type = "yarn"``)."""

    factor: float
    """How many times the original context is stretched."""
    original_max_position: int
    """Context length of pre-training (``original_max_position_embeddings``)."""
    beta_fast: float = 32.0
    """Pairs turning more often than this over the original context keep their frequency."""
    beta_slow: float = 1.0
    """Pairs turning less often than this are interpolated (slowed by ``factor``)."""
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    """With both set, the magnitude is yarn_magnitude(factor, mscale) / yarn_magnitude(factor,
    mscale_all_dim) (DeepSeek's form); otherwise yarn_magnitude(factor)."""
    attention_factor: float | None = None
    """An explicit magnitude, overriding the two above."""
    truncate: bool = True
    """Round the blend's pair range outwards to whole pairs."""

    def __post_init__(self) -> None:
        if not self.factor >= 1:
            raise ValueError(f"Yarn.factor must be >= 1 (the context is stretched), got "
                             f"{self.factor}")
        if not (isinstance(self.original_max_position, int)
                and self.original_max_position > 0):
            raise ValueError("Yarn.original_max_position must be a positive int (the "
                             f"pre-training context), got {self.original_max_position!r}")
        # equal betas (Kimi K2's 1.0, 1.0) make the blend a step at one pair
        if not self.beta_fast >= self.beta_slow > 0:
            raise ValueError(f"Yarn needs beta_fast >= beta_slow > 0, got beta_fast="
                             f"{self.beta_fast}, beta_slow={self.beta_slow}")

    def magnitude(self) -> float:
        """The factor on cos and sin."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return (yarn_magnitude(self.factor, self.mscale)
                    / yarn_magnitude(self.factor, self.mscale_all_dim))
        return yarn_magnitude(self.factor)

    def inv_freq(self, dim: int, theta: float, *, device=None,
                 dtype=torch.float32) -> torch.Tensor:
        """[dim/2] frequencies of the rotated pairs."""

        def pair_turning(turns: float) -> float:
            # pair i has wavelength 2π·theta^(2i/dim): it turns L/wavelength times over L
            # positions; solved for i
            return dim * math.log(self.original_max_position / (2 * math.pi * turns)) / (
                2 * math.log(theta))

        lo, hi = pair_turning(self.beta_fast), pair_turning(self.beta_slow)
        if self.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if hi == lo:
            hi += 1e-3  # a blend of one pair: a step, not a division by zero
        plain = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=dtype) / dim)
        pairs = torch.arange(dim // 2, device=device, dtype=dtype)
        slowed = ((pairs - lo) / (hi - lo)).clamp(0, 1)  # 0: keep, 1: divide by factor
        return plain * (1 - slowed) + plain / self.factor * slowed


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float,
         scaling: Yarn | None = None) -> torch.Tensor:
    """Rotary embedding, half-split convention: x [B, heads, L, D], positions [L] int64.

    The frequencies are recomputed per call (D/2 values): no buffer to initialise after
    ``to_empty``, and positions can be any subset of the sequence (context parallelism).
    Computed in at least fp32 and cast back to x's dtype."""
    d, dt = x.shape[-1], _compute_dtype(x)
    if scaling is None:
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=dt) / d)
    else:
        inv_freq = scaling.inv_freq(d, theta, device=x.device, dtype=dt)
    angles = positions.to(dt)[:, None] * inv_freq[None]  # [L, D/2]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # [L, D]
    if scaling is not None:
        m = scaling.magnitude()
        cos, sin = cos * m, sin * m
    x1, x2 = x.to(dt).chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(dt) * cos + rotated * sin).to(x.dtype)
