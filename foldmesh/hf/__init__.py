"""Hugging Face checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and Kimi K2 /
Moonlight, which share its architecture) in and out of foldmesh.

    model = from_pretrained("Qwen3-30B-A3B/", mesh=mesh)   # each rank reads its shards
    save_pretrained(model, "out/")                         # every rank calls; rank 0 writes

Loading reads a local directory with config.json and safetensors files; saving writes the
Hub's per-expert format, which ``transformers.AutoModelForCausalLM`` loads.
"""

from ._config import config_from_hf, hf_config_from, infer_architecture
from ._load import from_pretrained, load_hf_weights
from ._names import ARCHITECTURES, CheckpointError
from ._save import save_pretrained

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "config_from_hf",
    "from_pretrained",
    "hf_config_from",
    "infer_architecture",
    "load_hf_weights",
    "save_pretrained",
]
