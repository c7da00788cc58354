"""What every part of ``bench_gpu.py`` shares: the context, results as they come, timing.

A part runs in its own process (``bench_gpu.py --child PART``) and reports through an
``Emitter`` (``_bench_emit``): each result printed and saved the moment it exists.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from _bench_emit import Emitter
from bench_kernels import MODELS as KERNEL_MODELS
from bench_kernels import Bench, MoEShape

# The three MoE shapes of the GPU benchmark (H, F per expert, E, k), and a tiny CPU stand-in.
MODELS = {name: KERNEL_MODELS[name] for name in ("Mixtral-8x7B", "Qwen2-57B-A14B",
                                                 "DeepSeek-V3-like")}
DRY_MODELS = {"tiny-moe": MoEShape(32, 24, 4, 2)}


class Timer(Bench):
    """``bench_kernels.Bench`` with shorter CUDA timing and a guard for slow calls.

    On CUDA a call that takes over ``slow_s`` is timed as the median of 3 event-timed calls
    instead of ``triton.testing.do_bench``'s many; on CPU (dry runs) one warm-up call and
    ``cpu_repeats`` timed calls.
    """

    def __init__(self, device: torch.device, warmup_ms: float = 10, rep_ms: float = 50,
                 slow_s: float = 0.2, cpu_repeats: int = 1):
        super().__init__(device)
        self.warmup_ms, self.rep_ms, self.slow_s, self.cpu_repeats = (warmup_ms, rep_ms,
                                                                      slow_s, cpu_repeats)

    def time_ms(self, fn, grad_to_none=None) -> float:
        def reset():
            for t in grad_to_none or ():
                t.grad = None

        if not self.cuda:
            fn()
            times = []
            for _ in range(self.cpu_repeats):
                reset()
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        import triton.testing

        # NOTE: host sync: the first call (compilation, autotuning) decides how to time.
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if time.perf_counter() - start <= self.slow_s:
            return triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                           grad_to_none=grad_to_none, return_mode="median")
        times = []
        for _ in range(3):
            reset()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()  # NOTE: host sync, per timed call
            times.append(begin.elapsed_time(end))
        return statistics.median(times)


@dataclass
class Context:
    """What a part gets from the command line."""

    device: torch.device
    dry: bool
    emit: Emitter
    timer: Timer
    args: object  # the parsed command line (part-specific settings)
    gen: torch.Generator = field(init=False)

    def __post_init__(self):
        self.gen = torch.Generator(self.device).manual_seed(0)

    @property
    def models(self) -> dict[str, MoEShape]:
        return DRY_MODELS if self.dry else MODELS

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "CPU (dry run)"


def make_context(args, results: str | None) -> Context:
    """The device (CUDA, or CPU in a dry run; a real run without CUDA stops here)."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.dry_run:
        device = torch.device("cpu")
    else:
        sys.exit("bench_gpu: no CUDA device; use --dry-run to check the script on CPU")
    return Context(device, args.dry_run, Emitter(results), Timer(device), args)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (NaN stays NaN, so ``not err <= tol`` fails it)."""
    g, w = got.detach().double(), want.detach().double()
    num, den = (g - w).norm().item(), w.norm().item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def routing(tokens: int, experts: int, topk: int, gen: torch.Generator,
            active: int | None = None):
    """[T, k] distinct random experts per token and [T, k] probabilities summing to 1 per
    token; ``active`` < E routes to the first ``active`` experts only (the rest stay empty)."""
    dev = gen.device
    scores = torch.rand(tokens, experts, generator=gen, device=dev)
    if active is not None:
        scores[:, active:] = -1.0
    idx = scores.topk(topk, dim=1).indices
    logits = torch.randn(tokens, topk, generator=gen, device=dev)
    return idx, torch.softmax(logits, dim=1)


def triton_problem(device: torch.device) -> str | None:
    """Why the triton backend cannot run on ``device`` here, or None."""
    from foldmesh.kernels import _backend

    if not _backend.triton_available():
        return "triton cannot be imported"
    if device.type == "cuda":
        return None
    if not _backend.interpret_mode():
        return "TRITON_INTERPRET is off (CPU)"
    problem = getattr(_backend, "interpreter_problem", lambda: None)
    return problem()


def grouped_mm_problem() -> str | None:
    """None when foldmesh.kernels has ``backend="grouped_mm"``, else why not."""
    from foldmesh.kernels import _backend

    if "grouped_mm" in getattr(_backend, "BACKENDS", ()):
        return None
    return "not available: foldmesh.kernels has no backend 'grouped_mm'"


def backends(ctx: Context, gemm: bool) -> tuple[list[str], dict[str, str]]:
    """The backends to run (triton, grouped_mm for the GEMM ops, torch) and why others not."""
    problems = {"triton": triton_problem(ctx.device)}
    if gemm:
        problems["grouped_mm"] = grouped_mm_problem()
    problems["torch"] = None
    usable = [b for b, why in problems.items() if why is None]
    return usable, {b: why for b, why in problems.items() if why is not None}


def versions() -> dict:
    out = {"torch": torch.__version__.split("+")[0]}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # a missing or broken triton is reported, not fatal
        out["triton"] = "unavailable"
    return out


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
