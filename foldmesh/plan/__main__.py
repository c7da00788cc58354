"""``python -m foldmesh.plan``: rank the folds of a model on a cluster, or evaluate one.

    python -m foldmesh.plan --model mixtral-8x22b --gpus 128 --gpus-per-node 8 --gpu h100 \\
        --global-batch 256 --seq-len 4096 [--top 10] [--json plan.json] [--plot plan.png]
    python -m foldmesh.plan --model path/to/hf_dir_or_config.toml ...
    python -m foldmesh.plan --model mixtral-8x22b --gpus 128 --fold tp=2,ep=8,pp=8,etp=1
    python -m foldmesh.plan --dry-run --model mixtral-8x22b --gpus 1024 \\
        --fold tp=2,ep=8,pp=8,etp=1 [--rank R]

``--fold`` takes the degrees tp, cp, pp, ep, etp (dp and edp are inferred; giving them
checks them) and optionally vpp (stages per pp rank), mbs, layers (an explicit pipeline
split, the layers of each stage joined by "+", as the trainer's ``fold.pp_layers``), ac
(none/full), dp_mode (fsdp/replicate) and schedule. Hardware: ``--gpu`` names a preset
(h100, h200, b200, a100) or a TOML file; ``--set name=value`` overrides any of its fields.
``--kernels foldmesh`` (the default) times compute at foldmesh's own measured kernel rates
where the preset has them (h200; ``foldmesh/plan/rates/``), ``--kernels megatron`` at the
fractions calibrated on the paper's Table 3 (Megatron-Core's kernels); presets without
measured rates use the calibrated fractions either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .._fold import Fold, FoldError
from ..models import PRESETS, ModelConfig
from ._estimate import estimate
from ._hardware import HARDWARE, hardware
from ._report import plot, table, write_json
from ._search import nothing_fits, search, valid
from ._workload import Layout, Workload

FOLD_KEYS = ("tp", "cp", "dp", "pp", "ep", "etp", "edp", "vpp", "mbs", "layers", "ac",
             "dp_mode", "schedule")


def load_model(spec: str) -> ModelConfig:
    """A preset name, a Hugging Face directory or config.json, or a trainer TOML config."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.suffix == ".toml" and path.is_file():
        from ..train import load_config, model_config

        return model_config(load_config(["--config", str(path)]))
    if path.is_dir() or path.suffix == ".json":
        from ..hf import config_from_hf
        from ..hf._load import read_config

        config = path if path.is_dir() else path.parent
        return config_from_hf(read_config(config))[0]
    raise FoldError(f"--model {spec!r} is not a model preset, a Hugging Face directory or "
                    f"config.json, or a trainer .toml file; presets: {', '.join(PRESETS)}")


def parse_fold(text: str, gpus: int, workload: Workload, batch: bool = True) -> Layout:
    """``tp=2,ep=8,pp=8,etp=1[,vpp=..,mbs=..,ac=..,dp_mode=..,schedule=..]`` as a Layout."""
    values: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in FOLD_KEYS or not value.strip():
            raise FoldError(f"--fold {text!r}: cannot parse {item!r}; write key=value pairs "
                            f"separated by commas, keys from {', '.join(FOLD_KEYS)}")
        values[key] = value.strip()
    ints = {}
    for key in ("tp", "cp", "dp", "pp", "ep", "etp", "edp", "vpp", "mbs"):
        if key in values:
            try:
                ints[key] = int(values[key])
            except ValueError:
                raise FoldError(f"--fold: {key}={values[key]!r} is not an integer") from None
    degrees = {k: ints[k] for k in ("tp", "cp", "dp", "pp", "ep", "etp", "edp") if k in ints}
    try:
        fold = Fold(**degrees).resolve(gpus)
    except FoldError as e:
        raise FoldError(f"--fold {text!r} does not fit --gpus {gpus}: {e}") from None
    pp = fold.pp
    layers = ()
    if "layers" in values:  # an explicit pipeline split: layers=7+8+7+7+7+7+7+6
        try:
            layers = tuple(int(n) for n in values["layers"].split("+"))
        except ValueError:
            raise FoldError(f"--fold: layers={values['layers']!r}: give the layers of each "
                            "pipeline stage joined by '+', e.g. layers=7+8+7+6") from None
    vpp = ints.get("vpp", 1)
    schedule = values.get("schedule", "Interleaved1F1B" if vpp > 1 else "1F1B")
    layout = Layout(fold, micro_batch=ints.get("mbs", 1), schedule=schedule,
                    stages_per_rank=vpp if pp > 1 else 1,
                    activation_checkpoint=values.get("ac", "none"),
                    data_parallel=values.get("dp_mode", "fsdp"), pp_layers=layers)
    why = valid(workload, layout, batch)
    if why:
        raise FoldError(f"--fold {text!r}: {why}")
    return layout


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m foldmesh.plan",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="preset, HF directory/config.json, or TOML")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) in the job")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: the preset's 8")
    p.add_argument("--gpu", default="h100", help=f"{', '.join(HARDWARE)} or a .toml file")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a hardware field (e.g. network_bandwidth=25e9)")
    p.add_argument("--kernels", default=None, choices=("foldmesh", "megatron"),
                   help="compute rates: foldmesh's measured kernels where the preset has "
                        "them (default), or the fractions calibrated on Megatron-Core's "
                        "(the paper's Table 3)")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="token dropping with this capacity (default: the model's)")
    p.add_argument("--imbalance", type=float, default=1.0,
                   help="max/mean expert load of a learned router, as the trainer's expert-"
                        "load metrics report it (default 1: force-balanced routing)")
    p.add_argument("--mbs", default="1,2", help="micro-batch sizes to search")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--fold", default=None, help="evaluate this fold instead of searching")
    p.add_argument("--json", default=None, help="write every layout's estimate here")
    p.add_argument("--plot", default=None, help="draw MFU and step time per layout (PNG)")
    p.add_argument("--dry-run", action="store_true",
                   help="simulate one rank of --fold on the fake process group")
    p.add_argument("--rank", type=int, default=0, help="the rank --dry-run simulates")
    return p


def _hardware(args) -> object:
    overrides = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        try:
            overrides[key] = float(value) if key != "name" else value
        except ValueError:
            raise FoldError(f"--set {item!r}: the value must be a number") from None
        if not eq:
            raise FoldError(f"--set {item!r}: write FIELD=VALUE")
    if args.gpus_per_node is not None:
        overrides["gpus_per_node"] = args.gpus_per_node
    hw = hardware(args.gpu, kernels=args.kernels, **overrides)
    if args.gpus % hw.gpus_per_node and args.gpus > hw.gpus_per_node:
        raise FoldError(f"--gpus {args.gpus} is not a whole number of nodes of "
                        f"--gpus-per-node {hw.gpus_per_node}")
    return hw


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.gpus <= 0:
            raise FoldError(f"--gpus must be positive, got {args.gpus}")
        hw = _hardware(args)
        model = load_model(args.model)
        if args.capacity_factor is not None:
            model = dataclasses.replace(model, capacity_factor=args.capacity_factor)
        workload = Workload(model, args.global_batch, args.seq_len, compute_dtype=args.dtype,
                            expert_imbalance=args.imbalance)
        if args.dry_run:
            return _dry_run(args, workload, hw)
        if args.fold:
            estimates = [estimate(workload, parse_fold(args.fold, args.gpus, workload), hw)]
        else:
            try:
                mbs = tuple(int(x) for x in args.mbs.split(","))
            except ValueError:
                raise FoldError(f"--mbs {args.mbs!r}: give micro-batch sizes as integers "
                                "separated by commas, e.g. 1,2") from None
            if min(mbs) < 1:
                raise FoldError(f"--mbs {args.mbs!r}: micro-batch sizes must be >= 1")
            estimates = search(workload, args.gpus, hw, micro_batches=mbs)
            if not any(e.fits for e in estimates):
                raise FoldError(nothing_fits(workload, args.gpus, hw, estimates))
    except FoldError as e:
        print(f"foldmesh.plan: {e}", file=sys.stderr)
        return 2
    print(table(estimates, args.top))
    if args.json:
        write_json(estimates, args.json)
    if args.plot:
        name = args.model if args.model in PRESETS else Path(args.model).stem
        plot(estimates, args.plot, title=name)
    return 0


def _dry_run(args, workload: Workload, hw) -> int:
    from ._comm import bytes_by
    from ._comm import step_collectives as predict
    from ._dry_run import dry_run

    if not args.fold:
        raise FoldError("--dry-run needs --fold (the fold to simulate)")
    layout = parse_fold(args.fold, args.gpus, workload, batch=False)  # one micro-batch runs
    report = dry_run(workload, layout, args.rank)
    # the workload as it ran: routing made static (pad_to_capacity), which the planner needs
    want = bytes_by(predict(report.workload, layout, args.rank, microbatches=1, trainer=False,
                            p2p=False), layout.fold)
    got = report.collectives
    print(report.table)
    print(f"\nrank {args.rank} of {args.gpus}: {report.seconds:.1f} s; parameters "
          f"{report.param_bytes / 2**30:.2f} GiB, saved activations "
          f"{report.saved_activation_bytes / 2**30:.2f} GiB")
    keys = sorted(set(got) | set(want))
    same = all(got.get(k) == want.get(k) for k in keys)
    print("counted bytes equal the planner's" if same else "counted bytes differ:")
    for k in keys:
        if got.get(k) != want.get(k):
            print(f"  {k}: counted {got.get(k)}, planned {want.get(k)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict() | {"planned": {
            "/".join(k): v for k, v in want.items()}}, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
