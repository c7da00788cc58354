"""Part ``kernels``: every kernel per backend at the three MoE shapes, the backend table, and
the planner's measured rates.

Dimension legend: T tokens, k top-k, E experts, H hidden size, F expert FFN size, N = T·k
routed rows, K / M a grouped GEMM's reduction and output sizes.

Per shape (T = 16384 tokens, bf16, uniform and Zipf routing): permute / unpermute against
the device copy (``bench_kernels.bench_permute``), the gate/up (K = H, M = 2F) and down
(K = F, M = H) grouped GEMMs and the whole ``swiglu_experts``, forward and forward +
backward, for every backend (triton, grouped_mm, torch). Each backend is checked against the
torch reference before it is timed. The fastest backend per shape goes into the backend
table (``foldmesh.kernels._table.record``, after each model, so a killed part keeps what it
measured); the planner's rates (``planner_rates``) are re-emitted after each model too.
"""

from __future__ import annotations

import datetime
import math
import sys

import torch
from _bench_ceilings import attention_tflops, copy_gbps, dense_tflops, elementwise_gbps
from _bench_common import MODELS, Context, backends, free_memory, versions
from bench_kernels import bench_permute, check, gemm_times, make_routing, randn

SKEWS = ("uniform", "zipf")
TOKENS, DRY_TOKENS = 16384, 16
# One more measurement for the planner's "small" grouped-GEMM class (under 256 rows per
# expert): the DeepSeek-like GEMMs at T = 4096 (128 rows per expert), uniform routing only.
SMALL_CLASS = ("DeepSeek-V3-like", 4096)
CLASSES = ("small", "medium", "large")
CHECKED_EXPERTS = 8


def shape_class(rows_per_group: float, k: int, n: int) -> str:
    """The planner's grouped-GEMM shape class (``foldmesh.plan._rates.shape_class``)."""
    try:
        from foldmesh.plan._rates import shape_class as planner_shape_class
    except ImportError:  # the same rule, for a tree whose planner does not have it yet
        m = min(rows_per_group, k, n)
        return "small" if m < 256 else "medium" if m < 2048 else "large"
    return planner_shape_class(rows_per_group, k, n)


def swiglu_times(ctx: Context, shape, tokens: int, skew: str, names: list[str]) -> dict:
    """Check, then time ``swiglu_experts`` forward + backward per backend (ms)."""
    from foldmesh.kernels import swiglu_experts

    dt, gen = torch.bfloat16, ctx.gen
    idx, _ = make_routing(tokens, shape, skew, gen)
    counts = torch.bincount(idx.flatten(), minlength=shape.experts)
    n_rows, h, f = tokens * shape.topk, shape.hidden, shape.ffn
    x = randn(n_rows, h, gen=gen, dtype=dt).requires_grad_()
    wgu = randn(shape.experts, h, 2 * f, gen=gen, dtype=dt, scale=h**-0.5).requires_grad_()
    wd = randn(shape.experts, f, h, gen=gen, dtype=dt, scale=f**-0.5).requires_grad_()
    probs = torch.rand(n_rows, device=ctx.device, generator=gen).requires_grad_()
    dy = randn(n_rows, h, gen=gen, dtype=dt)
    leaves = [x, wgu, wd, probs]

    def run(b):
        return swiglu_experts(x, wgu, wd, counts, probs, backend=b)

    # The weight gradients are compared on their first CHECKED_EXPERTS experts: a full
    # second copy of the DeepSeek-like ones (22 GB) would not fit beside the rest on an H100.
    def grads():
        return [x.grad, wgu.grad[:CHECKED_EXPERTS].clone(), wd.grad[:CHECKED_EXPERTS].clone(),
                probs.grad]

    want = run("torch")
    want.backward(dy)
    want_grads = grads()
    for t in leaves:
        t.grad = None
    for b in (b for b in names if b != "torch"):
        y = run(b)
        check(f"swiglu_experts ({b})", y, want)
        y.backward(dy)
        for g, w, what in zip(grads(), want_grads, ("dx", "dw_gate_up", "dw_down", "dprobs"),
                              strict=True):
            check(f"swiglu_experts {what} ({b})", g, w)
        for t in leaves:
            t.grad = None
    want = want_grads = None
    return {b: ctx.timer.time_ms(lambda b=b: run(b).backward(dy), leaves) for b in names}


def _best(ms: dict) -> str:
    finite = {b: t for b, t in ms.items() if math.isfinite(t) and t > 0}
    return min(finite, key=finite.get) if finite else "-"


def planner_rates(ctx: Context, base: dict, gemms: list[dict], moves: list[dict]) -> tuple:
    """The ``planner_rates`` block and its notes from what was measured so far; the third
    item lists the grouped-GEMM shape classes nothing measured."""
    fwd, bwd, missing = {}, {}, []
    for c in CLASSES:
        mine = [g for g in gemms if g["class"] == c]
        if mine:
            fwd[c] = sum(g["flops"] for g in mine) / sum(g["fwd_ms"] for g in mine) / 1e9
            back = [g for g in mine if g["bwd_ms"] > 0]
            bwd[c] = (sum(2 * g["flops"] for g in back) / sum(g["bwd_ms"] for g in back) / 1e9
                      if back else math.nan)
        if c not in fwd or not math.isfinite(bwd.get(c, math.nan)):
            missing.append(c)
    notes = ["bf16; grouped GEMMs: the fastest backend per shape, FLOPs over time summed per "
             "class, bwd = the forward + backward time less the forward's, 2x its FLOPs; "
             "permute: permute + unpermute bytes over their times (fastest backend each); "
             "attention: causal SDPA fwd+bwd, Mixtral heads; elementwise: RMSNorm fwd+bwd"]
    if missing and ctx.dry:  # the tiny dry-run shapes are all "small": fill the others
        src = next((c for c in CLASSES if c not in missing), None)
        for c in missing:
            fwd[c], bwd[c] = (fwd[src], bwd[src]) if src else (1.0, 1.0)
        notes.append(f"DRY RUN: classes {missing} copied from {src or 'nothing (1.0)'}")
    permute = (sum(m["bytes"] for m in moves) / sum(m["ms"] for m in moves) / 1e6
               if moves else math.nan)
    rates = {"gpu": ctx.device_name(), "date": datetime.date.today().isoformat(),
             "dense_gemm_tflops": base["dense"], "copy_gbps": base["copy"],
             "grouped_gemm_tflops": {"fwd": {c: fwd.get(c, math.nan) for c in CLASSES},
                                     "bwd": {c: bwd.get(c, math.nan) for c in CLASSES}},
             "permute_gbps": permute, "attention_tflops": base["attention"],
             "elementwise_gbps": base["elementwise"]}
    return rates, "; ".join(notes), ([] if ctx.dry else missing)


def _save(ctx: Context, rows: list[dict], rates: dict, notes: str, missing: list) -> None:
    """Write the backend table rows and the planner's rates (temporary paths in a dry run)."""
    args = ctx.args
    try:
        from foldmesh.kernels._table import record
    except ImportError as err:
        ctx.emit.note(f"backend table not written: {err}")
    else:
        try:
            if rows:
                path = record(rows, path=args.table or None)
                ctx.emit.put("backend_table_path", str(path), show=False)
        except Exception as err:  # the measurements are in the report all the same
            ctx.emit.note(f"backend table not written: {type(err).__name__}: {err}")
    ctx.emit.put("planner_rates", rates)
    try:
        from foldmesh.plan._rates import save_rates
    except ImportError:
        ctx.emit.note("planner rates not saved: foldmesh.plan._rates.save_rates is missing")
        return
    if missing:
        ctx.emit.note(f"planner rates not saved yet: no measurement of the classes {missing}")
        return
    if not math.isfinite(rates["permute_gbps"]):
        ctx.emit.note("planner rates not saved yet: no permute measurement")
        return
    v = versions()
    source = (f"scripts/bench_gpu.py on {rates['gpu']}, torch {v['torch']}, "
              f"triton {v['triton']}")
    try:
        path = save_rates(rates | {"notes": notes}, source, path=args.rates or None)
    except Exception as err:  # e.g. a GPU without a planner preset: pass --rates PATH
        ctx.emit.note(f"planner rates not saved: {type(err).__name__}: {err}")
        return
    ctx.emit.put("planner_rates_path", str(path), show=False)


def run(ctx: Context) -> None:
    _, gemm_why = backends(ctx, gemm=True)
    for b, why in gemm_why.items():
        ctx.emit.note(f"backend {b}: {why}")
    base = {"copy": copy_gbps(ctx), "dense": dense_tflops(ctx)}
    base["attention"], attn_shape = attention_tflops(ctx)
    base["elementwise"], norm_shape = elementwise_gbps(ctx)
    for what, value in (("device copy GB/s", base["copy"]),
                        ("dense GEMM TFLOP/s", base["dense"]),
                        (f"causal SDPA fwd+bwd TFLOP/s {attn_shape}", base["attention"]),
                        (f"RMSNorm fwd+bwd GB/s {norm_shape}", base["elementwise"])):
        ctx.emit.row("kernels.single", {"what": what, "value": value})

    from foldmesh.kernels._table import device_family

    v = versions()
    stamp = {"family": device_family(ctx.device), "device": ctx.device_name(),
             "date": datetime.date.today().isoformat(), "torch": v["torch"],
             "triton": v["triton"], "source": "scripts/bench_gpu.py"}
    tokens = DRY_TOKENS if ctx.dry else TOKENS
    jobs = [(name, shape, tokens, SKEWS, True) for name, shape in ctx.models.items()]
    if not ctx.dry:  # the small class before the large DeepSeek-like run, which may time out
        small = (SMALL_CLASS[0], MODELS[SMALL_CLASS[0]], SMALL_CLASS[1], ("uniform",), False)
        jobs.insert(len(jobs) - 1, small)
    out = {"table": [], "gemms": [], "moves": []}
    failed = []
    for name, shape, t, skews, full in jobs:
        try:
            for skew in skews:
                measure(ctx, {"model": name, "T": t, "routing": skew}, shape, base, stamp,
                        out, full)
        except Exception as err:  # e.g. out of memory: keep the other models' results
            ctx.emit.note(f"kernels {name} T={t}: FAILED, {type(err).__name__}: {err}")
            failed.append(name)
        rates, notes, missing = planner_rates(ctx, base, out["gemms"], out["moves"])
        _save(ctx, out["table"], rates, notes, missing)
        free_memory(ctx.device)
    if failed:
        sys.exit(f"kernels: {failed} failed (see the notes above)")


def measure(ctx: Context, tag: dict, shape, base: dict, stamp: dict, out: dict,
            full: bool) -> None:
    """One shape and routing: its rows go to the report as they come and to ``out``: table
    (backend-table rows), gemms (the planner's grouped-GEMM rates), moves (its permute rate).
    ``full`` adds permute and swiglu_experts to the grouped GEMMs."""
    gemm_names, gemm_why = backends(ctx, gemm=True)
    move_names, move_why = backends(ctx, gemm=False)
    # without the grouped_mm backend, the raw torch._grouped_mm call stands in for it
    extras = ("dense", "_grouped_mm") if "grouped_mm" in gemm_why else ("dense",)
    dt, t, skew = torch.bfloat16, tag["T"], tag["routing"]
    if full and "triton" in move_names:
        for row in bench_permute(ctx.timer, shape, t, skew, dt, base["copy"], ctx.gen):
            ctx.emit.row("kernels.permute", tag | row)
            if row["op"] in ("permute (op)", "unpermute"):
                nbytes = row["GB/s"] * row["triton ms"] * 1e6
                out["moves"].append({"bytes": nbytes,
                                     "ms": min(row["triton ms"], row["torch ms"])})
    elif full:
        ctx.emit.note(f"permute not measured: triton {move_why.get('triton')}")
    for proj in ("up", "down"):
        g = gemm_times(ctx.timer, shape, t, skew, dt, proj, ctx.gen, backends=gemm_names,
                       extras=extras)
        for mode in ("fwd", "fwd+bwd"):
            flops = g["flops"] * (3 if mode == "fwd+bwd" else 1)
            row = tag | {"op": f"gemm {proj} {mode}", "K": g["k"], "M": g["m"]}
            for b, time_ms in g[mode].items():
                row[f"{b} ms"], row[f"{b} TFLOP/s"] = time_ms, flops / time_ms / 1e9
            mine = {b: g[mode][b] for b in gemm_names}  # dense etc. are not backends
            ctx.emit.row("kernels.gemm", row | {"best": _best(mine)})
        ms = {b: g["fwd+bwd"][b] for b in gemm_names if math.isfinite(g["fwd+bwd"][b])}
        best = _best(ms)
        if best != "-":
            out["gemms"].append({"class": shape_class(g["rows"] / g["groups"], g["k"], g["m"]),
                                 "flops": g["flops"], "fwd_ms": g["fwd"][best],
                                 "bwd_ms": g["fwd+bwd"][best] - g["fwd"][best]})
            out["table"].append(stamp | {"op": "grouped_gemm", "k": g["k"], "n": g["m"],
                                         "groups": g["groups"], "rows": g["rows"],
                                         "routing": skew, "ms": ms, "best": best})
        free_memory(ctx.device)
    if full:
        ms = swiglu_times(ctx, shape, t, skew, gemm_names)
        flops = 3 * 6 * t * shape.topk * shape.hidden * shape.ffn
        row = tag | {"op": "swiglu_experts fwd+bwd"}
        for b, time_ms in ms.items():
            row[f"{b} ms"], row[f"{b} TFLOP/s"] = time_ms, flops / time_ms / 1e9
        ms = {b: v for b, v in ms.items() if math.isfinite(v)}
        ctx.emit.row("kernels.swiglu_experts", row | {"best": _best(ms)})
        if ms:
            out["table"].append(stamp | {"op": "swiglu_experts", "k": shape.hidden,
                                         "n": shape.ffn, "groups": shape.experts,
                                         "rows": t * shape.topk, "routing": skew, "ms": ms,
                                         "best": _best(ms)})
        free_memory(ctx.device)
