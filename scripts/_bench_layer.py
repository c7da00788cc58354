"""Part ``layer``: one MoE layer forward + backward, foldmesh's kernels against a reference
written here on ``torch._grouped_mm`` the way TorchTitan's MoE does it.

Dimension legend: T tokens, H hidden size, F expert FFN size, E experts, k top-k, N = T·k
routed rows.

Both layers route the same way (softmax over E of x @ w_router in float32, top-k,
renormalised) and run bf16 weights, dropless:

* foldmesh: ``permute`` -> ``swiglu_experts`` -> ``unpermute`` (weighted by the probs), for
  each backend of the experts (triton, grouped_mm, torch); permute / unpermute run triton
  for the triton and grouped_mm rows (torch where triton cannot run), torch for the torch row.
* reference: argsort of the expert ids, gather rows (``index_select``), grouped mm with int32
  offsets, SwiGLU, grouped mm, outputs scaled by the probs and scatter-added
  (``index_add_``) back to their tokens.

Each foldmesh output and input gradient is compared with the reference's (bf16 tolerance)
before anything is timed. TFLOP/s count the routed GEMMs only: 3 GEMMs of 2·N·H·F forward
(gate, up, down), twice that backward, 18·N·H·F in all; the router, the permutes and the
activation are in the time but not in the count.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from _bench_common import Context, backends, free_memory, rel_err

TOKENS, DRY_TOKENS = 8192, 16
# bf16 against bf16: two GEMMs, the activation and the combine, each rounded, on both sides
# (on CPU the Triton interpreter's bf16 rounding about doubles foldmesh triton's share).
TOL = 3e-2


def route(x: torch.Tensor, w_router: torch.Tensor, k: int):
    """x [T, H] -> expert ids [T, k] and their renormalised softmax probs [T, k] (float32)."""
    probs = torch.softmax((x @ w_router).float(), dim=-1)
    top, idx = probs.topk(k, dim=-1)
    return idx, top / top.sum(-1, keepdim=True)


def foldmesh_layer(x, w_router, w_gate_up, w_down, k: int, backend: str, moves: str):
    """foldmesh's MoE path on one device; ``moves`` is the backend of permute / unpermute."""
    from foldmesh.kernels import permute, swiglu_experts, unpermute

    idx, probs = route(x, w_router, k)
    perm = permute(x, idx, probs, w_down.shape[0], backend=moves)
    y = swiglu_experts(perm.tokens, w_gate_up, w_down, perm.counts, backend=backend)
    return unpermute(y, perm, probs, backend=moves)


def reference_layer(x, w_router, w_gate_up, w_down, k: int):
    """TorchTitan-style: sort copies by expert, torch._grouped_mm twice, scatter-add back."""
    idx, probs = route(x, w_router, k)
    experts = idx.reshape(-1)
    order = torch.argsort(experts, stable=True)
    counts = torch.zeros(w_down.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, experts, torch.ones_like(experts, dtype=torch.int32))
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    token = order // k
    rows = x.index_select(0, token)  # [N, H]
    gate, up = torch._grouped_mm(rows, w_gate_up, offs=offsets).chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * up, w_down, offs=offsets)  # [N, H]
    weights = probs.reshape(-1).index_select(0, order).unsqueeze(1)
    out = (out.float() * weights).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, out)


def one_shape(ctx: Context, model: str, s, tokens: int, names: list[str], moves: str) -> None:
    """Check, then time, every implementation at one shape (its tensors die on return)."""
    h, f, e, k, dt, gen = s.hidden, s.ffn, s.experts, s.topk, torch.bfloat16, ctx.gen

    def leaf(*size, scale):
        out = torch.empty(size, device=ctx.device, dtype=dt).normal_(0, scale, generator=gen)
        return out.requires_grad_()

    x = leaf(tokens, h, scale=1.0)
    weights = [leaf(h, e, scale=h**-0.5), leaf(e, h, 2 * f, scale=h**-0.5),
               leaf(e, f, h, scale=f**-0.5)]  # router [H, E], gate|up [E, H, 2F], down
    leaves = [x, *weights]
    dy = torch.empty(tokens, h, device=ctx.device, dtype=dt).normal_(generator=gen)
    tag = {"model": model, "T": tokens, "H": h, "F": f, "E": e, "k": k}
    ref_name = "reference (torch._grouped_mm)"
    impls = {ref_name: lambda: reference_layer(x, *weights, k)}
    for b in names:
        m = "torch" if b == "torch" else moves
        impls[f"foldmesh {b}"] = lambda b=b, m=m: foldmesh_layer(x, *weights, k, b, m)

    # Correct first: every implementation's output and dx against the reference's.
    want = want_dx = None
    try:
        out = impls[ref_name]()
        out.backward(dy)
        want, want_dx = out.detach(), x.grad
    except Exception as err:  # e.g. a torch without _grouped_mm: time foldmesh alone
        ctx.emit.note(f"layer {model}: reference failed, {type(err).__name__}: {err}")
        del impls[ref_name]
    for name in [n for n in impls if n != ref_name]:
        x.grad = None
        try:
            out = impls[name]()
            out.backward(dy)
        except Exception as err:
            ctx.emit.note(f"layer {model} {name}: FAIL {type(err).__name__}: {err}")
            del impls[name]
            continue
        errs = {} if want is None else {"rel err out": rel_err(out, want),
                                        "rel err dx": rel_err(x.grad, want_dx)}
        ok = all(v <= TOL for v in errs.values())
        ctx.emit.row("layer.check", tag | {"impl": name, "result": "PASS" if ok else "FAIL",
                                           **errs})
        if not ok:  # a wrong layer is not timed
            del impls[name]
    want = want_dx = out = None
    for p in leaves:
        p.grad = None

    flops = 18 * tokens * k * h * f  # 3 GEMMs of 2·N·H·F forward, twice that backward
    ref_ms = None
    for name, fn in impls.items():
        ms = ctx.timer.time_ms(lambda fn=fn: fn().backward(dy), leaves)
        ref_ms = ms if name == ref_name else ref_ms
        ctx.emit.row("layer", tag | {"impl": name, "ms": ms, "TFLOP/s": flops / ms / 1e9,
                                     "time / reference": ms / ref_ms if ref_ms else math.nan})


def run(ctx: Context) -> None:
    names, why = backends(ctx, gemm=True)
    for b, reason in why.items():
        ctx.emit.note(f"layer: foldmesh {b}: {reason}")
    moves = "triton" if "triton" in names else "torch"
    tokens = DRY_TOKENS if ctx.dry else TOKENS
    failed = []
    for model, shape in ctx.models.items():
        try:
            one_shape(ctx, model, shape, tokens, names, moves)
        except Exception as err:  # e.g. out of memory: the next shape still runs
            ctx.emit.note(f"layer {model}: FAILED, {type(err).__name__}: {err}")
            failed.append(model)
        free_memory(ctx.device)
    if failed:
        sys.exit(f"layer: {failed} failed (see the notes above)")
