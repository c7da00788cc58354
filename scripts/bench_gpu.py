"""Everything foldmesh wants to know from one GPU, in one command (about 8 minutes on one
H100/H200). From the repository root, installed (``pip install -e .``) or a bare copy::

    python scripts/bench_gpu.py --out runs/bench_gpu/report.md

It updates two shipped files in the tree, the backend table ``kernels/backend_table.json``
and the planner's rates ``foldmesh/plan/rates/<h100|h200>.json``. On a machine whose copy of
the tree is thrown away afterwards, write the report where it can be fetched and copy the
two files beside it::

    python scripts/bench_gpu.py --out RESULTS/report.md; \
        cp kernels/backend_table.json foldmesh/plan/rates/*.json RESULTS/

On CPU, every part end to end with tiny shapes (torch path, the Triton interpreter where it
runs, a 2-step trainer), in about a minute; the timings mean nothing; CI runs it::

    python scripts/bench_gpu.py --dry-run

Parts (``--parts ceilings,check,kernels,layer,trainer``, the default; ``--limit PART=S``
changes a part's time limit, default in ``PARTS``):

* ``ceilings``: the device, its copy bandwidth (2 GiB bf16, read + write) and a dense bf16
  GEMM 8192^3 (``_bench_ceilings.py``).
* ``check``: every kernel op (permute, unpermute, sort_chunks, grouped_gemm, swiglu_experts)
  and backend (triton, grouped_mm, torch) against references: random shapes, empty experts,
  tail rows, capacity dropping, padding, gradients; PASS/FAIL per case (``_bench_check.py``).
* ``kernels``: the per-backend kernel table at Mixtral-8x7B, Qwen2-57B-A14B and
  DeepSeek-V3-like shapes, uniform and Zipf routing, forward + backward; writes the fastest
  backend per shape into the shipped backend table (``foldmesh.kernels._table.record``) and
  the planner's measured rates (``planner_rates``; ``foldmesh.plan._rates.save_rates``)
  (``_bench_table.py``).
* ``layer``: one MoE layer forward + backward (T = 8192) at the three shapes, foldmesh's
  kernels per backend against a TorchTitan-style ``torch._grouped_mm`` layer, outputs
  compared first (``_bench_layer.py``).
* ``trainer``: ``python -m foldmesh.train`` for 12 steps of configs/single_gpu.toml and
  configs/two_mixtral_layers.toml, against the planner's prediction (``_bench_trainer.py``).

Each part runs in its own process group with its own time limit; at the limit the whole
group is killed (SIGTERM, then SIGKILL), and what it printed stays: every result line is
printed as it is measured. Before each part, ``nvidia-smi`` is asked for other processes on
the GPU; any are reported loudly, and the report is marked. Written: the markdown report
(``--out``, default ``runs/bench_gpu/<time>/report.md``), the JSON of all results next to it
(``.json``) and the log of everything printed (``.log``). A dry run writes the backend table
and the rates next to the report, never to the shipped files.

Exit status: 0 when every part finished and no check failed, else 1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shlex
import shutil
import socket
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # the helper modules beside this file
    sys.path.insert(0, str(HERE))

# part -> (module with run(ctx), time limit in seconds on a GPU): 470 s together. The check
# part compiles and autotunes the Triton kernels first (Triton's disk cache serves the rest).
PARTS = {"ceilings": ("_bench_ceilings", 15), "check": ("_bench_check", 75),
         "kernels": ("_bench_table", 150), "layer": ("_bench_layer", 70),
         "trainer": ("_bench_trainer", 160)}
HIDDEN = {"_hang": ("_bench_procs", 600)}  # for the tests: a part that hangs
DRY_LIMIT = 150


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, in order (default {','.join(PARTS)})")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on CPU (GPU used if present): checks the script itself")
    p.add_argument("--out", default=None, help="markdown report path; .json and .log beside it")
    p.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                   help="a part's time limit (repeatable)")
    p.add_argument("--table", default=None,
                   help="backend table to record into (default: the shipped one; dry run: "
                        "a file beside the report)")
    p.add_argument("--rates", default=None,
                   help="planner rates file (default: the GPU preset's shipped one; dry run: "
                        "a file beside the report)")
    p.add_argument("--steps", type=int, default=12, help="trainer steps per config")
    p.add_argument("--trainer-limit", type=float, default=75,
                   help="seconds per trainer run, inside the trainer part's limit")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    """One part, in its own process (``--child PART``)."""
    import _bench_boot
    from _bench_emit import Emitter

    module, _ = {**PARTS, **HIDDEN}[args.child]
    if args.child == "_hang":  # no torch: it starts in a blink
        importlib.import_module(module).hang(Emitter(args.results))
        return
    _bench_boot.boot()
    import torch

    if args.dry_run and not torch.cuda.is_available():
        # Before any Triton kernel is defined: the CPU runs them through the interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from _bench_common import make_context

    torch.manual_seed(0)
    importlib.import_module(module).run(make_context(args, args.results))


def _limits(args, parts: list[str]) -> dict[str, float]:
    known = {**PARTS, **HIDDEN}
    limits = {p: float(DRY_LIMIT if args.dry_run else known[p][1]) for p in parts}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in known or not seconds:
            sys.exit(f"bench_gpu: --limit {item!r}: expected PART=SECONDS with PART one of "
                     f"{', '.join(PARTS)}")
        limits[name] = float(seconds)
    return limits


def _paths(args) -> tuple[Path, Path]:
    if args.out:
        out = Path(args.out)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = ROOT / "runs" / "bench_gpu" / (stamp + ("-dry" if args.dry_run else ""))
        out = out / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, out.with_suffix(".log")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        child(args)
        return 0
    from _bench_procs import Log, gpu_processes, run_part
    from _bench_report import read_records, write

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS and p not in HIDDEN]
    if bad:
        sys.exit(f"bench_gpu: unknown parts {bad}; choose from {', '.join(PARTS)}")
    limits = _limits(args, parts)
    out, log_path = _paths(args)
    if args.dry_run:  # never the shipped table or rates
        args.table = args.table or str(out.with_name(out.stem + ".dry-backend_table.json"))
        args.rates = args.rates or str(out.with_name(out.stem + ".dry-rates.json"))
    log = Log(log_path)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    meta = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "dry_run": args.dry_run, "parts": parts,
            "limits": limits, "foreign_gpu_processes": {}}
    log(f"[bench] {command}")
    log(f"[bench] report {out}, log {log_path}; parts {', '.join(parts)}")
    results_dir = Path(tempfile.mkdtemp(prefix="bench_gpu_results_"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done: dict[str, dict] = {}
    try:
        for part in parts:
            lines, why = gpu_processes()
            meta["nvidia_smi"] = why or "checked before every part"
            if lines:
                meta["foreign_gpu_processes"][part] = lines
                log("[bench] " + "!" * 70)
                log(f"[bench] !!! OTHER PROCESSES ON THE GPU before part {part}: timings will "
                    "be wrong")
                for line in lines:
                    log(f"[bench] !!!   {line}")
                log("[bench] " + "!" * 70)
            results = results_dir / f"{part}.jsonl"
            cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--child", part,
                   "--results", str(results), "--steps", str(args.steps),
                   "--trainer-limit", str(args.trainer_limit)]
            cmd += ["--dry-run"] if args.dry_run else []
            cmd += ["--table", args.table] if args.table else []
            cmd += ["--rates", args.rates] if args.rates else []
            status = run_part(part, cmd, limits[part], log, env=env, cwd=str(ROOT))
            done[part] = status | {"records": read_records(results)}
    finally:
        for part in parts:  # an interrupted run still writes what it has
            done.setdefault(part, {"status": "not run", "exit_code": None, "seconds": 0.0,
                                   "limit": limits[part],
                                   "records": read_records(results_dir / f"{part}.jsonl")})
        report, json_path = write(out, meta, done)
        shutil.rmtree(results_dir, ignore_errors=True)
        log(f"[bench] wrote {report}, {json_path} and {log_path}")
        log.close()
    failed_checks = [r for p in done.values() for r in p["records"]
                     if r.get("table") in ("check", "layer.check")
                     and r["row"].get("result") == "FAIL"]
    ok = all(p["status"] == "ok" for p in done.values()) and not failed_checks
    if failed_checks:
        print(f"[bench] {len(failed_checks)} checks FAILED (see the report)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
