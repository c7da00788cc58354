"""Decoder-only MoE transformers as plain modules, with named presets."""

from .config import ModelConfig
from .model import Attention, Block, RMSNorm, Transformer, causal_attention, rope
from .presets import PRESETS, preset

__all__ = [
    "PRESETS",
    "Attention",
    "Block",
    "ModelConfig",
    "RMSNorm",
    "Transformer",
    "causal_attention",
    "preset",
    "rope",
]
