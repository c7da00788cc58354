"""Part ``check``: every kernel op and backend against references, on the device, in bf16.

Dimension legend: T tokens, k top-k, E experts (G groups), H hidden size, F FFN size,
N rows, K / M a grouped GEMM's reduction and output sizes, R ranks, C capacity.

Ops and cases (one PASS/FAIL line each, printed as it is decided):

* permute: random, empty experts, capacity dropping (both policies), padding
  (``pad_to_capacity``); the forward bit-exact against the torch backend, invariants on every
  backend (offsets = cumsum(counts), each row a copy of its token, padding rows zero, the row
  map and row copy inverse to each other, counts <= C), gradients of x and the probs.
* unpermute: random, no probs, capacity dropping, padding, against a float32 gather-sum.
* sort_chunks: random (empty chunks), tail rows (past the last chunk), inverse round trip,
  against a host-built row order; gradients.
* grouped_gemm and swiglu_experts: random, empty groups, tail rows (past ``offsets[-1]``),
  padding / no probs, forward and every gradient against the torch reference on float32
  copies (relative error <= ``TOL``, ``TOL_SWIGLU``); tail rows and empty groups' weight
  gradients exactly zero.

Backends: triton (compiled on CUDA, the interpreter in a CPU dry run when it can run),
grouped_mm for the GEMM ops (reported 'not available' when foldmesh.kernels lacks it; a case
it hands to its fallback says so) and torch.
"""

from __future__ import annotations

import random
import traceback

import torch
from _bench_common import Context, backends, rel_err, routing

# Relative error of bf16 operands against a float32 reference: 1e-3 .. 1e-2 for one GEMM
# (METHOD.md); swiglu_experts chains two GEMMs and the activation, each rounded to bf16.
# On CPU the Triton interpreter's bf16 rounding gives about twice torch's error.
TOL = 1e-2
TOL_SWIGLU = 2e-2
ROW_OPS = ("permute", "unpermute", "sort_chunks")
GEMM_OPS = ("grouped_gemm", "swiglu_experts")
DT = torch.bfloat16


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> float:
    """The relative error of ``got``; AssertionError when it is over ``tol`` (or NaN)."""
    err = rel_err(got, want)
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3g} > {tol:g}")
    return err


def _equal(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.shape != want.shape or not torch.equal(got, want):
        raise AssertionError(f"{name}: differs from the reference ({tuple(got.shape)} vs "
                             f"{tuple(want.shape)})")


class Checks:
    """Runs cases, prints and records one PASS/FAIL row each, counts them."""

    def __init__(self, ctx: Context):
        self.ctx, self.dev, self.gen = ctx, ctx.device, ctx.gen
        self.passed = self.failed = 0

    def randn(self, *size, scale=1.0, grad=True, dtype=DT) -> torch.Tensor:
        t = torch.randn(*size, device=self.dev, generator=self.gen) * scale
        return t.to(dtype).requires_grad_(grad)

    def case(self, op: str, backend: str, case: str, shape: str, fn, *args) -> None:
        """Run ``fn(backend, *args, case)`` and record its PASS / FAIL row."""
        try:
            detail = fn(backend, *args, case) or ""
            result = "PASS"
            self.passed += 1
        except Exception as err:  # every failure is a result line, and the part goes on
            result, detail = "FAIL", f"{type(err).__name__}: {err}"
            self.failed += 1
            traceback.print_exc()
        self.ctx.emit.row("check", {"op": op, "backend": backend, "case": case, "shape": shape,
                                    "result": result, "detail": detail})

    # ------------------------------------------------------------------ permute, unpermute
    def permute(self, b: str, t: int, h: int, e: int, k: int, case: str):
        from foldmesh.kernels import capacity_for, permute

        kw, active = {}, None
        if case == "empty experts":
            e, active = max(e, k + 2), k
        if case.startswith("capacity") or case == "padding":
            kw = dict(capacity=capacity_for(t, e, k, 0.5),
                      drop_policy="position" if case.endswith("position") else "probs",
                      pad_to_capacity=case == "padding")
        idx, p = routing(t, e, k, self.gen, active=active)
        x = self.randn(t, h)
        probs = p.clone().requires_grad_()
        got = permute(x, idx, probs, e, backend=b, **kw)
        _invariants(got, x, k, kw.get("capacity"))
        detail = f"N={got.tokens.shape[0]}" + (f" E={e}, {active} used" if active else "")
        if b == "torch":
            return detail + " (the reference: invariants only)"
        x2, probs2 = x.detach().clone().requires_grad_(), p.clone().requires_grad_()
        want = permute(x2, idx, probs2, e, backend="torch", **kw)
        for name in ("tokens", "counts", "offsets", "row_map", "row_copy", "probs"):
            _equal(name, getattr(got, name), getattr(want, name))
        r_rows = self.randn(*got.tokens.shape, grad=False)
        r_probs = torch.randn(got.probs.shape, device=self.dev, generator=self.gen)
        for perm in (got, want):
            ((perm.tokens.float() * r_rows.float()).sum() + (perm.probs * r_probs).sum()
             ).backward()
        _close("dx", x.grad, x2.grad)
        _close("dprobs", probs.grad, probs2.grad)
        return detail

    def unpermute(self, b: str, t: int, h: int, e: int, k: int, case: str):
        from foldmesh.kernels import capacity_for, permute, unpermute

        kw = {}
        if case in ("capacity dropping", "padding"):
            kw = dict(capacity=capacity_for(t, e, k, 0.5), pad_to_capacity=case == "padding")
        idx, p = routing(t, e, k, self.gen)
        perm = permute(self.randn(t, h, grad=False), idx, p, e, backend="torch", **kw)
        y = self.randn(perm.tokens.shape[0], h)
        probs = None if case == "no probs" else p.clone().requires_grad_()
        out = unpermute(y, perm, probs, backend=b)
        # float32 gather-sum: out[t] = sum_j probs[t, j] * y[row_map[t, j]], dropped copies 0
        y32 = y.detach().float().requires_grad_()
        p32 = None if probs is None else probs.detach().clone().requires_grad_()
        padded = torch.cat([y32, y32.new_zeros(1, h)])
        rows = torch.where(perm.row_map >= 0, perm.row_map, y.shape[0])
        picked = padded[rows]  # [T, k, H]
        if p32 is not None:
            picked = picked * p32.unsqueeze(-1)
        want = picked.sum(1)
        _close("out", out, want)
        dy = self.randn(t, h, grad=False)
        out.backward(dy)
        want.backward(dy.float())
        _close("dy", y.grad, y32.grad)
        if probs is not None:
            _close("dprobs", probs.grad, p32.grad)
        return f"N={y.shape[0]}"

    # ------------------------------------------------------------------ sort_chunks
    def sort_chunks(self, b: str, ranks: int, experts: int, h: int, case: str):
        from foldmesh.kernels import sort_chunks

        g = random.Random(ranks * 100 + experts)
        sizes = [g.choice([0, g.randint(1, 40)]) for _ in range(ranks * experts)]
        tail = g.randint(1, 7) if case == "tail rows" else 0
        n = sum(sizes) + tail
        src, starts, at = [], {}, 0  # rows in (rank, expert) order -> (expert, rank) order
        for r in range(ranks):
            for ex in range(experts):
                starts[r, ex] = at
                at += sizes[r * experts + ex]
        for ex in range(experts):
            for r in range(ranks):
                src += range(starts[r, ex], starts[r, ex] + sizes[r * experts + ex])
        src += range(sum(sizes), n)
        src = torch.tensor(src, dtype=torch.int64, device=self.dev)
        split = torch.tensor(sizes, dtype=torch.int64, device=self.dev)
        x = self.randn(n, h)
        out = sort_chunks(x, split, ranks, experts, backend=b)
        _equal("out", out, x.detach()[src])
        if case == "round trip":
            _equal("inverse", sort_chunks(out, split, ranks, experts, inverse=True, backend=b),
                   x.detach())
        dy = self.randn(n, h, grad=False)
        out.backward(dy)
        want = torch.zeros_like(dy)
        want[src] = dy
        _equal("dx", x.grad, want)
        return f"N={n} chunks={ranks}x{experts}"

    # ------------------------------------------------------------------ grouped GEMMs
    def _groups(self, g: int, rows: int, case: str) -> list[int]:
        r = random.Random(g * 1000 + rows)
        if case == "padding":  # every group C rows, the rows past each group's own count zero
            return [max(1, rows // g)] * g
        sizes = [r.randint(0, max(1, 2 * rows // g)) for _ in range(g)]
        if case == "empty groups":
            sizes = [s if i % 2 else 0 for i, s in enumerate(sizes)]
        return sizes

    def grouped_gemm(self, b: str, rows: int, k: int, m: int, g: int, case: str):
        from foldmesh.kernels import grouped_gemm

        sizes = self._groups(g, rows, case)
        tail = 5 if case == "tail rows" else 0
        n = sum(sizes) + tail
        x = self.randn(n, k)
        if case == "padding":  # zero the padding rows, as permute(pad_to_capacity=True) does
            with torch.no_grad():
                at = 0
                for s in sizes:
                    x[at + s // 2:at + s] = 0
                    at += s
        w = self.randn(g, k, m, scale=k**-0.5)
        offsets = torch.tensor(sizes, device=self.dev).cumsum(0)
        x32, w32 = (t.detach().float().requires_grad_() for t in (x, w))
        y = grouped_gemm(x, w, offsets, backend=b)
        want = grouped_gemm(x32, w32, offsets, backend="torch")
        errs = [_close("y", y, want)]
        dy = self.randn(n, m, grad=False)
        y.backward(dy)
        want.backward(dy.float())
        errs += [_close("dx", x.grad, x32.grad), _close("dw", w.grad, w32.grad)]
        end = n - tail
        _equal("tail rows of y", y[end:].detach(), torch.zeros_like(y[end:]))
        _equal("tail rows of dx", x.grad[end:], torch.zeros_like(x.grad[end:]))
        empty = torch.tensor([s == 0 for s in sizes], device=self.dev)
        _equal("dw of empty groups", w.grad[empty], torch.zeros_like(w.grad[empty]))
        return f"max rel err {max(errs):.2g}" + _fallback(b, x, w, offsets)

    def swiglu_experts(self, b: str, rows: int, h: int, f: int, g: int, case: str):
        from foldmesh.kernels import swiglu_experts

        sizes = self._groups(g, rows, "empty groups" if case == "empty experts" else case)
        tail = 5 if case == "tail rows" else 0
        n = sum(sizes) + tail
        counts = torch.tensor(sizes, dtype=torch.int64, device=self.dev)
        x, wgu, wd = self.randn(n, h), self.randn(g, h, 2 * f, scale=h**-0.5), \
            self.randn(g, f, h, scale=f**-0.5)
        probs = None
        if case != "no probs":
            probs = torch.rand(n, device=self.dev, generator=self.gen).requires_grad_()
        leaves = [t for t in (x, wgu, wd, probs) if t is not None]
        refs = [t.detach().float().requires_grad_() for t in leaves]
        y = swiglu_experts(x, wgu, wd, counts, probs, backend=b)
        want = swiglu_experts(refs[0], refs[1], refs[2], counts,
                              refs[3] if probs is not None else None, backend="torch")
        errs = [_close("y", y, want, TOL_SWIGLU)]
        dy = self.randn(n, h, grad=False)
        y.backward(dy)
        want.backward(dy.float())
        for name, t, r in zip(("dx", "dw_gate_up", "dw_down", "dprobs"), leaves, refs,
                              strict=False):
            errs.append(_close(name, t.grad, r.grad, TOL_SWIGLU))
        end = n - tail
        _equal("tail rows of y", y[end:].detach(), torch.zeros_like(y[end:]))
        return f"max rel err {max(errs):.2g}" + _fallback(b, x, wgu, counts.cumsum(0))


def _invariants(perm, x: torch.Tensor, k: int, capacity: int | None) -> None:
    """What any permute must satisfy, whatever the backend."""
    _equal("offsets = cumsum(counts)", perm.offsets, torch.cumsum(perm.counts, 0))
    n = perm.tokens.shape[0]
    if capacity is None:
        assert n == x.shape[0] * k, f"dropless: {n} rows, expected T*k = {x.shape[0] * k}"
    elif perm.padded:
        assert n == perm.num_experts * capacity, f"padded: {n} rows != E*C"
    else:
        assert n == int(perm.counts.sum()), f"{n} rows != sum(counts)"
        assert int(perm.counts.max()) <= capacity, "an expert kept more than C rows"
    real = perm.row_copy >= 0
    want = x.detach()[perm.row_copy.clamp(min=0) // k]
    _equal("rows are copies of their tokens", perm.tokens.detach()[real], want[real])
    pad = perm.tokens.detach()[~real]
    _equal("padding rows are zero", pad, torch.zeros_like(pad))
    kept = perm.row_map.reshape(-1) >= 0
    flat = torch.arange(perm.row_map.numel(), device=x.device)
    _equal("row_copy[row_map] = copy", perm.row_copy[perm.row_map.reshape(-1)[kept]],
           flat[kept])


def _fallback(b: str, x, w, offsets) -> str:
    if b != "grouped_mm":
        return ""
    from foldmesh.kernels._grouped_mm import grouped_mm_problem

    why = grouped_mm_problem(x.detach(), w.detach(), offsets)
    return f" (grouped_mm fell back: {why})" if why else ""


def run(ctx: Context) -> None:
    checks = Checks(ctx)
    row_names, row_why = backends(ctx, gemm=False)
    gemm_names, gemm_why = backends(ctx, gemm=True)
    for b, why in gemm_why.items():  # triton: every op; grouped_mm: the GEMM ops
        ops = ROW_OPS + GEMM_OPS if b == "triton" else GEMM_OPS
        for op in ops:
            ctx.emit.row("check", {"op": op, "backend": b, "case": "-", "shape": "-",
                                   "result": "not available", "detail": why})
    rng = random.Random(0)
    draws = 1 if ctx.dry else 2
    # (T, H, E, k) for the row ops; (rows, K, M, G) for the GEMMs. Odd sizes are deliberate:
    # the triton kernels mask them; grouped_mm hands them (K, M not multiples of 8) over.
    if ctx.dry:
        row_shapes = [(rng.randint(3, 12), rng.choice([8, 24]), rng.randint(2, 5), 2)]
        gemm_shapes = [(12, 16, 24, 3), (10, 12, 20, 2)]
    else:
        row_shapes = [(rng.randint(1, 2048), rng.choice([64, 512, 1000]), rng.randint(2, 64),
                       rng.randint(1, 8)) for _ in range(draws)]
        row_shapes = [(t, h, e, min(k, e)) for t, h, e, k in row_shapes]
        gemm_shapes = [(rng.randint(64, 4096), 512, 768, rng.randint(2, 64)),
                       (rng.randint(64, 2048), 1024, 256, 8), (rng.randint(8, 300), 100, 36, 5)]
    for b in row_names:
        for t, h, e, k in row_shapes:
            shape = f"T={t} H={h} E={e} k={k}"
            for case in ("random", "empty experts", "capacity probs", "capacity position",
                         "padding"):
                checks.case("permute", b, case, shape, checks.permute, t, h, e, k)
            for case in ("random", "no probs", "capacity dropping", "padding"):
                checks.case("unpermute", b, case, shape, checks.unpermute, t, h, e, k)
        for ranks, experts in ((2, 3), (1, 4)) if ctx.dry else ((4, 8), (8, 2), (1, 16)):
            for case in ("random", "tail rows", "round trip"):
                checks.case("sort_chunks", b, case, f"R={ranks} E={experts}",
                            checks.sort_chunks, ranks, experts, 16)
    for b in gemm_names:
        for rows, k, m, g in gemm_shapes:
            for case in ("random", "empty groups", "tail rows", "padding"):
                checks.case("grouped_gemm", b, case, f"N~{rows} K={k} M={m} G={g}",
                            checks.grouped_gemm, rows, k, m, g)
        for rows, h, m, g in gemm_shapes[:2]:
            for case in ("random", "empty experts", "tail rows", "no probs"):
                checks.case("swiglu_experts", b, case, f"N~{rows} H={h} F={m // 2} G={g}",
                            checks.swiglu_experts, rows, h, m // 2, g)
    ctx.emit.row("check.summary", {"passed": checks.passed, "failed": checks.failed,
                                   "not available": {**row_why, **gemm_why}})
