"""Part ``trainer``: ``python -m foldmesh.train`` for a few steps per config, next to the
planner's prediction for the same config on this GPU.

Each run gets checkpointing off (``checkpoint.every = 0``; the trainer's final checkpoint is
skipped by stopping it once its last step is recorded), a run directory under a temporary
folder, a metrics record every step and no validation. Its output streams through, each
``metrics.jsonl`` record becomes a result row as soon as it is written, and a run that
outlives its own limit is stopped (SIGTERM, then SIGKILL) with what it recorded kept.

Reported per config: the first step's time, the steady step (median of the steps after the
third), tokens/s and MFU (medians over the same steps), peak memory (max), and the
planner's step time, tokens/s, MFU and memory (``foldmesh.plan.from_train_config`` and
``estimate``, what ``python -m foldmesh.train --plan`` runs, on the GPU's preset), with the
ratios measured / predicted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _bench_boot import ROOT
from _bench_common import Context

CONFIGS = {"single_gpu": "configs/single_gpu.toml",
           "two_mixtral_layers": "configs/two_mixtral_layers.toml"}
WARMUP_STEPS = 3  # compilation, autotuning, the allocator's growth
GRACE_S = 10  # after the last step: time to exit before its final checkpoint is cut short
COMMON = ["--checkpoint.every", "0", "--checkpoint.resume", "false", "--metrics.log_every", "1",
          "--metrics.plots", "false", "--metrics.progress", "false", "--training.val_every", "0",
          "--metrics.tensorboard", "false", "--metrics.wandb", "false"]
# CPU dry run: a tiny model of each config's family, 2 sequences of 32 bytes.
DRY = ["--training.device", "cpu", "--training.global_batch", "2", "--training.micro_batch", "1",
       "--data.seq_len", "32", "--data.max_bytes", "300000",
       "--model.overrides.hidden_size", "32", "--model.overrides.num_layers", "1",
       "--model.overrides.num_heads", "4", "--model.overrides.num_kv_heads", "2",
       "--model.overrides.expert_ffn_size", "32"]


def overrides(steps: int, run_dir: str, dry: bool) -> list[str]:
    return [*COMMON, "--training.steps", str(steps), "--checkpoint.dir", run_dir,
            *(DRY if dry else [])]


def gpu_preset(ctx: Context) -> tuple[str, str]:
    """The planner's hardware preset for this device (H100 / H200 by name) and a remark."""
    if ctx.device.type != "cuda":
        return "h100", "dry run: the h100 preset"
    name = ctx.device_name().upper()
    for preset in ("h200", "h100", "b200", "a100"):
        if preset.upper() in name:
            return preset, ""
    return "h100", f"no planner preset for {ctx.device_name()}: the h100 preset"


def predict(argv: list[str], preset: str) -> dict:
    """The planner's estimate for the config these trainer arguments resolve to, one GPU."""
    from foldmesh.plan import estimate, from_train_config, hardware, valid
    from foldmesh.train import load_config

    cfg = load_config(argv)
    workload, layout = from_train_config(cfg, 1, "cuda")
    why = valid(workload, layout)
    if why:
        raise ValueError(f"the planner cannot model this run: {why}")
    e = estimate(workload, layout, hardware(preset).replace(gpus_per_node=1))
    out = {"step_s": e.step_time, "tokens_per_s": e.tokens_per_s_per_gpu, "mfu": e.mfu,
           "peak_mem_gib": e.memory.total / 2**30, "fits": e.fits}
    if hasattr(e, "largest_term"):
        name, seconds = e.largest_term()
        out["largest term"] = f"{name} {seconds:.3g} s"
    return out


def _pump(stream, lines: list[str]) -> None:
    for raw in iter(stream.readline, b""):
        text = raw.decode("utf-8", "replace").rstrip("\n")
        lines.append(text)
        print(f"  | {text}", flush=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_trainer(ctx: Context, name: str, argv: list[str], run_dir: Path, steps: int,
                limit: float) -> list[dict]:
    """Run one config; stream its lines and its metrics records; return the train records."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-u", os.path.join(ROOT, "scripts", "_bench_boot.py"),
           "foldmesh.train", *argv]
    ctx.emit.note(f"trainer {name}: {' '.join(cmd[3:])}")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    metrics, seen, records = run_dir / "metrics.jsonl", 0, []
    start, last_at = time.monotonic(), None
    try:
        while True:
            done = proc.poll() is not None
            if metrics.exists():
                new = metrics.read_text().splitlines()
                for line in new[seen:]:
                    if not line.endswith("}"):  # a record still being written
                        break
                    seen += 1
                    rec = json.loads(line)
                    if rec.get("kind") == "train":
                        records.append(rec)
                        ctx.emit.row("trainer.steps", {"config": name, **{
                            k: rec.get(k) for k in ("step", "loss", "step_time_s",
                                                    "tokens_per_s", "mfu", "peak_mem_gib")}})
                        if rec.get("step") == steps:
                            last_at = time.monotonic()
                    elif rec.get("kind") == "event":
                        ctx.emit.note(f"trainer {name} event: {rec.get('message')}")
            if done:
                break
            if last_at is not None and time.monotonic() - last_at > GRACE_S:
                ctx.emit.note(f"trainer {name}: stopped after its last step (the final "
                              "checkpoint is not needed)")
                break
            if time.monotonic() - start > limit:
                ctx.emit.note(f"trainer {name}: stopped at its limit of {limit:g} s after "
                              f"{len(records)} steps")
                break
            time.sleep(0.5)
    finally:
        _stop(proc)
        reader.join(timeout=10)
    if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL) and last_at is None:
        tail = "\n".join(lines[-15:])
        ctx.emit.note(f"trainer {name}: exit code {proc.returncode}; last lines:\n{tail}")
    return records


def summarize(records: list[dict]) -> dict:
    def median(key, rs):
        values = [r[key] for r in rs if r.get(key) is not None]
        return statistics.median(values) if values else None

    # a dry run's 2 steps have no steady part: its last step stands in
    steady = [r for r in records if r["step"] > WARMUP_STEPS] or records[-1:]
    first = next((r for r in records if r["step"] == 1), None)
    peaks = [r["peak_mem_gib"] for r in records if r.get("peak_mem_gib") is not None]
    return {"steps": len(records), "first step s": first and first["step_time_s"],
            "steady step s": median("step_time_s", steady),
            "tokens/s": median("tokens_per_s", steady), "MFU": median("mfu", steady),
            "peak mem GiB": max(peaks) if peaks else None,
            "final loss": records[-1]["loss"] if records else None}


def _ratio(a, b):
    return a / b if a is not None and b else None


def run(ctx: Context) -> None:
    args = ctx.args
    steps = 2 if ctx.dry else args.steps
    preset, remark = gpu_preset(ctx)
    if remark:
        ctx.emit.note(f"trainer: planner preset {remark}")
    kernels = os.environ.get("FOLDMESH_KERNELS", "auto")
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_trainer_"))
    try:
        for name, config in CONFIGS.items():
            argv = ["--config", os.path.join(ROOT, config),
                    *overrides(steps, str(tmp / name), ctx.dry)]
            try:
                plan = predict(argv, preset)
            except Exception as err:  # the measurement still runs
                ctx.emit.note(f"trainer {name}: planner failed, {type(err).__name__}: {err}")
                plan = {}
            records = run_trainer(ctx, name, argv, tmp / name, steps, args.trainer_limit)
            got = summarize(records)
            ctx.emit.row("trainer", {
                "config": config, "kernels": kernels, **got,
                "planner preset": preset, "planner step s": plan.get("step_s"),
                "step measured / planner": _ratio(got["steady step s"], plan.get("step_s")),
                "planner tokens/s": plan.get("tokens_per_s"),
                "tokens/s measured / planner": _ratio(got["tokens/s"], plan.get("tokens_per_s")),
                "planner MFU": plan.get("mfu"),
                "planner mem GiB": plan.get("peak_mem_gib"),
                "mem measured / planner": _ratio(got["peak mem GiB"], plan.get("peak_mem_gib")),
                "planner largest term": plan.get("largest term")})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
