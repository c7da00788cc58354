"""Triton MoE dispatch kernels with torch references."""
