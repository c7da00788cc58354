"""Benchmark foldmesh.kernels on one GPU: permute/unpermute bandwidth, grouped GEMM TFLOP/s.

On a GPU machine, one call runs everything (a few minutes, most of it Triton autotuning):

    python scripts/bench_kernels.py --out bench_kernels.md

On CPU, check every code path end to end with tiny shapes (torch path and Triton interpreter;
the timings are meaningless):

    python scripts/bench_kernels.py --dry-run

What is measured, for Mixtral-8x7B, Mixtral-8x22B, Qwen2-57B-A14B and DeepSeek-V3-like MoE
shapes at T = 16384 tokens, with uniform and Zipf-skewed top-k routing on random bf16 data:

* permute (full op, and the row move alone given the routing) and unpermute: time and
  achieved bandwidth (bytes of rows read + written), against a plain device copy measured in
  the same run and against the torch path (index_select / gather-sum);
* grouped GEMM of the gate/up (K=H, M=2F) and down (K=F, M=H) projections, forward and
  forward+backward: TFLOP/s over the real rows only, against ``torch._grouped_mm`` and against
  one dense cuBLAS GEMM of the same FLOPs.

Every Triton result is checked against the torch reference before it is timed. Times are
medians of ``triton.testing.do_bench`` (which flushes the L2 between runs); inputs smaller than
twice the L2 are also rotated between several copies.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoEShape:
    hidden: int  # H
    ffn: int  # F, per expert
    experts: int  # E
    topk: int  # k


MODELS = {
    "Mixtral-8x7B": MoEShape(4096, 14336, 8, 2),
    "Mixtral-8x22B": MoEShape(6144, 16384, 8, 2),
    "Qwen2-57B-A14B": MoEShape(3584, 2560, 64, 8),
    "DeepSeek-V3-like": MoEShape(7168, 2048, 256, 8),
}
DRY_MODELS = {"tiny-8e": MoEShape(48, 40, 8, 2), "tiny-32e": MoEShape(40, 24, 32, 4)}
ZIPF_EXPONENT = 1.2


class Bench:
    """Timing and input rotation on one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        l2 = torch.cuda.get_device_properties(device).L2_cache_size if self.cuda else 1 << 20
        self.rotate_bytes = 2 * l2

    def time_ms(self, fn: Callable[[], object], grad_to_none=None) -> float:
        if self.cuda:
            import triton.testing

            return triton.testing.do_bench(
                fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"
            )
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def rotated(self, make: Callable[[], tuple], nbytes: int) -> Callable[[], tuple]:
        """Cycle through enough copies of the inputs that they do not all fit in L2."""
        copies = [make() for _ in range(max(1, min(4, math.ceil(self.rotate_bytes / nbytes))))]
        cycle = itertools.cycle(copies)
        return lambda: next(cycle)

    def copy_gbps(self, nbytes: int) -> float:
        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=self.device).normal_()
        dst = torch.empty_like(src)
        return 2 * nbytes / self.time_ms(lambda: dst.copy_(src)) / 1e6


def check(name: str, got: torch.Tensor, want: torch.Tensor, rel: float = 2e-2) -> None:
    """Fail loudly unless max |got - want| <= rel * max |want| (in chunks: dw can be 15 GB)."""
    err = scale = 0.0
    chunks = zip(got.reshape(-1).split(1 << 26), want.reshape(-1).split(1 << 26), strict=True)
    for g, w in chunks:
        err = max(err, (g.float() - w.float()).abs().max().item())
        scale = max(scale, w.float().abs().max().item())
    if err > rel * max(scale, 1e-6):
        raise AssertionError(f"{name}: max error {err:.3g} exceeds {rel:g} x {scale:.3g}")


def make_routing(tokens: int, shape: MoEShape, skew: str, gen: torch.Generator):
    """[T, k] distinct experts per token (uniform or Zipf popularity) and [T, k] probs."""
    weights = torch.ones(shape.experts, device=gen.device)
    if skew == "zipf":
        ranks = torch.arange(1, shape.experts + 1, device=gen.device, dtype=torch.float)
        weights = ranks**-ZIPF_EXPONENT
    idx = torch.multinomial(weights.expand(tokens, -1), shape.topk, generator=gen)
    probs = torch.rand(tokens, shape.topk, generator=gen, device=gen.device)
    return idx, probs / probs.sum(1, keepdim=True)


def randn(*size: int, gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0):
    """Random data made on the device itself (the DeepSeek-like weights are 15 GB)."""
    out = torch.empty(size, dtype=dtype, device=gen.device)
    return out.normal_(0.0, scale, generator=gen)


def bench_permute(bench, shape, tokens, skew, dtype, copy_gbps, gen) -> list[dict]:
    from foldmesh.kernels import permute, unpermute
    from foldmesh.kernels._gather import gather_rows

    k = shape.topk
    idx, probs = make_routing(tokens, shape, skew, gen)
    x = randn(tokens, shape.hidden, gen=gen, dtype=dtype)
    perm = permute(x, idx, probs, shape.experts, backend="triton")
    ref = permute(x, idx, probs, shape.experts, backend="torch")
    if not torch.equal(perm.tokens, ref.tokens) or not torch.equal(perm.counts, ref.counts):
        raise AssertionError("permute: triton and torch disagree")
    y = randn(*perm.tokens.shape, gen=gen, dtype=dtype)
    check("unpermute", unpermute(y, perm, probs, backend="triton"),
          unpermute(y, perm, probs, backend="torch"))  # fmt: skip

    row_bytes = shape.hidden * x.element_size()
    n_rows = perm.tokens.shape[0]
    src_rows = perm.row_copy // k
    xs = bench.rotated(lambda: (x.clone(),), tokens * row_bytes)
    ys = bench.rotated(lambda: (y.clone(),), n_rows * row_bytes)
    cases = {
        "permute (op)": (2 * n_rows * row_bytes,
                         lambda b: permute(xs()[0], idx, probs, shape.experts, backend=b)),
        "permute (move)": (2 * n_rows * row_bytes,
                           lambda b: gather_rows(xs()[0], perm.row_copy, k)[0] if b == "triton"
                           else xs()[0].index_select(0, src_rows)),
        "unpermute": ((n_rows + tokens) * row_bytes,
                      lambda b: unpermute(ys()[0], perm, probs, backend=b)),
    }  # fmt: skip
    rows = []
    for op, (nbytes, run) in cases.items():
        t_triton = bench.time_ms(lambda run=run: run("triton"))
        t_torch = bench.time_ms(lambda run=run: run("torch"))
        gbps = nbytes / t_triton / 1e6
        rows.append({"op": op, "triton ms": t_triton, "GB/s": gbps,
                     "% of copy": 100 * gbps / copy_gbps, "torch ms": t_torch,
                     "torch GB/s": nbytes / t_torch / 1e6})  # fmt: skip
    return rows


def _ref_gemm(x, w, offsets):
    from foldmesh.kernels import grouped_gemm

    return grouped_gemm(x, w, offsets, backend="torch")


def _grouped_mm_weight(x, w, offsets, want):
    """``w`` in a layout for which torch._grouped_mm runs and matches ``want``, else None."""
    if not hasattr(torch, "_grouped_mm"):
        return None
    layouts = (lambda: w, lambda: w.transpose(1, 2).contiguous().transpose(1, 2))
    for layout in layouts:  # lazily: a column-major copy of the weights can be 15 GB
        candidate = layout()
        try:
            check("torch._grouped_mm", torch._grouped_mm(x, candidate, offs=offsets), want)
            return candidate
        except (RuntimeError, AssertionError, NotImplementedError):
            continue
    return None


def gemm_times(bench, shape, tokens, skew, dtype, proj, gen, backends=("triton",),
               extras=("dense", "_grouped_mm")) -> dict:
    """Check, then time one grouped GEMM projection for each backend (and the extras).

    Args:
        proj: "up" (K = H, M = 2F) or "down" (K = F, M = H).
        backends: foldmesh.kernels backends; each is checked forward and backward against
            the "torch" reference before it is timed.
        extras: "dense" (one cuBLAS GEMM of the same FLOPs) and "_grouped_mm" (the raw
            ``torch._grouped_mm`` call, where this torch has it and its layout rules allow).

    Returns:
        ``{"k", "m", "groups", "rows", "flops", "fwd": {name: ms}, "fwd+bwd": {name: ms}}``;
        flops is the forward's (dropless: every row is real); NaN where a time is missing.
    """
    from foldmesh.kernels import grouped_gemm

    dev = bench.device
    k_dim, m_dim = (shape.hidden, 2 * shape.ffn) if proj == "up" else (shape.ffn, shape.hidden)
    idx, _ = make_routing(tokens, shape, skew, gen)
    counts = torch.zeros(shape.experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, idx.flatten(), torch.ones_like(idx.flatten()))
    offsets = torch.cumsum(counts, 0)
    n_rows = tokens * shape.topk
    x = randn(n_rows, k_dim, gen=gen, dtype=dtype).requires_grad_()
    w = randn(shape.experts, k_dim, m_dim, gen=gen, dtype=dtype, scale=k_dim**-0.5)
    w.requires_grad_()
    dy = randn(n_rows, m_dim, gen=gen, dtype=dtype)

    # Verify forward and both gradients against the torch reference before timing.
    want = _ref_gemm(x, w, offsets)
    want.backward(dy)
    want_dx, want_dw = x.grad, w.grad
    x.grad = w.grad = None
    want = want.detach()
    for backend in (b for b in backends if b != "torch"):
        y = grouped_gemm(x, w, offsets, backend=backend)
        check(f"grouped_gemm {proj} ({backend})", y, want)
        y.backward(dy)
        check(f"grouped_gemm {proj} dx ({backend})", x.grad, want_dx)
        check(f"grouped_gemm {proj} dw ({backend})", w.grad, want_dw)
        x.grad = w.grad = y = None
    want_dx = want_dw = None

    def fwd_bwd(fn, leaves):
        return bench.time_ms(lambda: fn().backward(dy), grad_to_none=leaves)

    xs = bench.rotated(lambda: (x.detach().clone(),), x.numel() * x.element_size())
    nan = math.nan
    fwd, both = {}, {}
    with torch.no_grad():
        for backend in backends:
            fwd[backend] = bench.time_ms(
                lambda b=backend: grouped_gemm(xs()[0], w, offsets, backend=b))
    for backend in backends:
        both[backend] = fwd_bwd(lambda b=backend: grouped_gemm(x, w, offsets, backend=b), [x, w])
    if "dense" in extras:
        a = x.detach().clone().requires_grad_()
        b = randn(k_dim, m_dim, gen=gen, dtype=dtype, scale=k_dim**-0.5).requires_grad_()
        with torch.no_grad():
            fwd["dense"] = bench.time_ms(lambda: xs()[0] @ b)
        both["dense"] = fwd_bwd(lambda: a @ b, [a, b])
        a = b = None
    if "_grouped_mm" in extras:
        offs32 = offsets.to(torch.int32)
        w_gm = _grouped_mm_weight(x.detach(), w.detach(), offs32, want)
        w_gm = w_gm.detach().requires_grad_() if w_gm is not None else None
        fwd["_grouped_mm"] = both["_grouped_mm"] = nan
        if w_gm is not None:
            with torch.no_grad():
                fwd["_grouped_mm"] = bench.time_ms(
                    lambda: torch._grouped_mm(xs()[0], w_gm, offs=offs32))
            try:
                both["_grouped_mm"] = fwd_bwd(lambda: torch._grouped_mm(x, w_gm, offs=offs32),
                                              [x, w_gm])  # fmt: skip
            except RuntimeError:  # no autograd formula for it in this torch build
                pass
    return {"k": k_dim, "m": m_dim, "groups": shape.experts, "rows": n_rows,
            "flops": 2 * n_rows * k_dim * m_dim, "fwd": fwd, "fwd+bwd": both}


def bench_gemm(bench, shape, tokens, skew, dtype, proj, gen) -> list[dict]:
    times = gemm_times(bench, shape, tokens, skew, dtype, proj, gen)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        total = times["flops"] * (3 if mode == "fwd+bwd" else 1)
        tflops = {name: total / t / 1e9 for name, t in times[mode].items()}
        rows.append({"op": f"gemm {proj} {mode}", "triton ms": times[mode]["triton"],
                     "TFLOP/s": tflops["triton"],
                     "_grouped_mm TFLOP/s": tflops["_grouped_mm"],
                     "dense TFLOP/s": tflops["dense"],
                     "% of dense": 100 * tflops["triton"] / tflops["dense"]})  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    def fmt(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    cols = list(dict.fromkeys(c for r in rows for c in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU allowed")
    parser.add_argument("--tokens", type=int, default=None, help="T (default 16384; dry: 32)")
    parser.add_argument("--models", nargs="*", default=None, help="subset of model names")
    parser.add_argument("--out", default=None, help="write the markdown report here")
    args = parser.parse_args()

    if args.dry_run and not torch.cuda.is_available():
        # Must be set before the first Triton kernel module is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run to check the script on CPU")
    import triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = DRY_MODELS if args.dry_run else MODELS
    models = {n: s for n, s in models.items() if not args.models or n in args.models}
    tokens = args.tokens or (32 if args.dry_run else 16384)
    dtype = torch.bfloat16
    bench = Bench(device)
    gen = torch.Generator(device).manual_seed(0)

    copy_gbps = bench.copy_gbps((16 if args.dry_run else 1024) << 20)
    move_rows, gemm_rows = [], []
    for name, shape in models.items():
        for skew in ("uniform", "zipf"):
            tag = {"model": name, "routing": skew}
            print(f"[bench] {name} {skew}", flush=True)
            for row in bench_permute(bench, shape, tokens, skew, dtype, copy_gbps, gen):
                move_rows.append({**tag, **row})
            for proj in ("up", "down"):
                for row in bench_gemm(bench, shape, tokens, skew, dtype, proj, gen):
                    gemm_rows.append({**tag, **row})
            if bench.cuda:
                torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name(device) if bench.cuda else "CPU (dry run)"
    report = "\n\n".join([
        f"Device: {device_name}; date: {datetime.date.today()}; torch {torch.__version__}; "
        f"triton {triton.__version__}; T = {tokens}; dtype bfloat16; "
        f"device copy bandwidth {copy_gbps:.4g} GB/s (read + write).",
        "Permute / unpermute (GB/s = row bytes read + written per second):",
        markdown(move_rows),
        "Grouped GEMM (TFLOP/s over real rows; fwd+bwd counts 3x the forward FLOPs):",
        markdown(gemm_rows),
    ])  # fmt: skip
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
