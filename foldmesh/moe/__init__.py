"""MoE building blocks as plain modules; parallelism is applied from outside."""

from .router import Reductions, Router, RouterConfig, RouterOutput

__all__ = ["Reductions", "Router", "RouterConfig", "RouterOutput"]
