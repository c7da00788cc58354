"""Part ``ceilings``: the device, its copy bandwidth and dense GEMM rate; and the planner's
other single-kernel rates (attention, an RMSNorm), which the ``kernels`` part measures.

Dimension legend: B batch, S sequence, Hq / Hkv query / key-value heads, D head dim,
T tokens, H hidden size.
"""

from __future__ import annotations

import subprocess

import torch
from _bench_common import Context, versions

# Mixtral-8x7B's attention: 32 query heads, 8 key-value heads of 128, sequence 4096.
ATTN = dict(batch=4, seq=4096, heads=32, kv_heads=8, head_dim=128)
DRY_ATTN = dict(batch=1, seq=64, heads=4, kv_heads=2, head_dim=16)


def copy_gbps(ctx: Context) -> float:
    """Device copy of a large bf16 tensor (2 GiB; 16 MiB dry), read + write bytes per s."""
    return ctx.timer.copy_gbps((16 if ctx.dry else 2048) << 20)


def dense_tflops(ctx: Context) -> float:
    """One bf16 GEMM n x n x n on random data (n = 8192; 256 dry), TFLOP/s."""
    n = 256 if ctx.dry else 8192
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=ctx.gen)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=ctx.gen)
    return 2 * n**3 / ctx.timer.time_ms(lambda: a @ b) / 1e9


def attention_tflops(ctx: Context) -> tuple[float, dict]:
    """foldmesh's causal SDPA (``models.model.causal_attention``), bf16, forward + backward:
    causal FLOPs (the planner's count, 3 x the forward's 2·B·Hq·S²·D) per second."""
    from foldmesh.models.model import causal_attention

    s = DRY_ATTN if ctx.dry else ATTN
    b, n, hq, hkv, d = s["batch"], s["seq"], s["heads"], s["kv_heads"], s["head_dim"]

    def leaf(heads):
        t = torch.randn(b, heads, n, d, device=ctx.device, dtype=torch.bfloat16,
                        generator=ctx.gen)
        return t.requires_grad_()

    q, k, v = leaf(hq), leaf(hkv), leaf(hkv)
    dy = torch.randn(b, hq, n, d, device=ctx.device, dtype=torch.bfloat16, generator=ctx.gen)
    ms = ctx.timer.time_ms(lambda: causal_attention(q, k, v).backward(dy), [q, k, v])
    flops = 3 * 2 * b * hq * n * n * d
    return flops / ms / 1e9, s


def elementwise_gbps(ctx: Context) -> tuple[float, dict]:
    """foldmesh's RMSNorm on bf16 [T, H] (Mixtral: T 16384, H 4096), forward + backward, in
    the planner's byte count: x read and y written once forward, twice that backward."""
    from foldmesh.models.model import RMSNorm

    t, h = (64, 32) if ctx.dry else (16384, 4096)
    norm = RMSNorm(h, 1e-5, device=ctx.device, dtype=torch.bfloat16)
    x = torch.randn(t, h, device=ctx.device, dtype=torch.bfloat16, generator=ctx.gen)
    x.requires_grad_()
    dy = torch.randn_like(x)
    ms = ctx.timer.time_ms(lambda: norm(x).backward(dy), [x, norm.weight])
    nbytes = 3 * 2 * x.numel() * x.element_size()
    return nbytes / ms / 1e6, {"tokens": t, "hidden": h}


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else "?"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


def device_info(ctx: Context) -> dict:
    info = {"device": ctx.device_name(), **versions()}
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        info |= {"capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                 "memory_gib": round(p.total_memory / 2**30, 1),
                 "l2_mib": round(p.L2_cache_size / 2**20, 1), "cuda": torch.version.cuda,
                 "driver": _driver()}
    return info


def run(ctx: Context) -> None:
    ctx.emit.row("device", device_info(ctx))
    ctx.emit.row("ceilings", {"what": "device copy, bf16, read + write", "value": copy_gbps(ctx),
                              "unit": "GB/s"})
    n = 256 if ctx.dry else 8192
    ctx.emit.row("ceilings", {"what": f"dense bf16 GEMM {n}^3 (torch)",
                              "value": dense_tflops(ctx), "unit": "TFLOP/s"})
