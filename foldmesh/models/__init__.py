"""Decoder-only MoE transformers as plain modules, with named presets."""

from .config import ModelConfig
from .mla import MLAttention
from .model import Attention, Block, RMSNorm, Transformer, causal_attention
from .presets import PRESETS, preset
from .rope import Yarn, rope

__all__ = [
    "PRESETS",
    "Attention",
    "Block",
    "MLAttention",
    "ModelConfig",
    "RMSNorm",
    "Transformer",
    "Yarn",
    "causal_attention",
    "preset",
    "rope",
]
