"""The trainer end to end, launched with torchrun on gloo ranks: the loss falls, stop and resume
give the uninterrupted run's losses, checkpoints reshard to another fold and world size, a
killed rank is recovered under ``--max-restarts``, damaged checkpoints are refused, and bad
configurations fail before training.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from foldmesh.train import checkpoint as ckpt

TIMEOUT = 300
# a small model and short sequences: every launch is a few seconds of work on 2 cores
SMALL = ["--preset", "demo", "--model.overrides.num_layers", "2",
         "--model.overrides.hidden_size", "64", "--model.overrides.expert_ffn_size", "64",
         "--data.seq_len", "32", "--data.max_bytes", "400000", "--training.global_batch", "8",
         "--training.val_every", "0", "--metrics.progress", "false",
         "--metrics.plots", "false", "--metrics.log_every", "1"]
FOLD8 = ["--fold.tp", "2", "--fold.cp", "2", "--fold.ep", "4", "--fold.etp", "2"]
FOLD4 = ["--fold.tp", "1", "--fold.cp", "1", "--fold.ep", "4", "--fold.etp", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, run_dir: Path, *args: str, restarts: int = 0, check: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "--max-restarts", str(restarts),
           "-m", "foldmesh.train", *SMALL, "--checkpoint.dir", str(run_dir), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n"
                             f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, the last record of each step (a resumed run repeats steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def events(run_dir: Path) -> list[str]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["message"] for r in map(json.loads, lines) if r.get("kind") == "event"]


DETERMINISTIC = ["--training.deterministic", "true", "--training.steps", "8",
                 "--checkpoint.every", "4", "--checkpoint.keep", "3"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """8 ranks, TP2 CP2 DP2 / EP4 ETP2, 8 steps uninterrupted, checkpoints at 4 and 8."""
    run = tmp_path_factory.mktemp("uninterrupted")
    launch(8, run, *FOLD8, *DETERMINISTIC)
    return run


def test_stop_and_resume_gives_the_same_losses(reference_run, tmp_path):
    run = tmp_path / "resumed"
    launch(8, run, *FOLD8, *DETERMINISTIC, "--training.stop_after", "4")
    assert sorted(losses(run)) == [1, 2, 3, 4]
    launch(8, run, *FOLD8, *DETERMINISTIC)
    assert any("resumed from" in e for e in events(run))
    assert losses(run) == losses(reference_run)  # bitwise: deterministic mode


def test_checkpoint_reshards_to_another_fold_and_world(reference_run, tmp_path):
    run = tmp_path / "resharded"
    (run / "checkpoints").mkdir(parents=True)
    src = ckpt.checkpoint_dir(reference_run) / "step-00000004"
    shutil.copytree(src, run / "checkpoints" / src.name)
    # and from FSDP2 to replicated weights: DCP reshards by global shape and offset
    launch(4, run, *FOLD4, *DETERMINISTIC, "--training.stop_after", "1",
           "--fold.data_parallel", "replicate")
    want, got = losses(reference_run)[5], losses(run)[5]
    assert got == pytest.approx(want, rel=1e-4), (got, want)


def test_killed_rank_is_recovered_from_the_last_checkpoint(tmp_path):
    run = tmp_path / "fault"
    out = launch(4, run, *FOLD4, "--training.steps", "6", "--checkpoint.every", "3",
                 "--training.fail_at_step", "5", restarts=1)
    assert "fault injection" in out.stdout + out.stderr
    assert any("resumed from" in e and "step 3" in e for e in events(run))
    assert sorted(losses(run)) == list(range(1, 7))
    assert ckpt.latest(run).name == "step-00000006"


def damaged_copy(reference_run, tmp_path, damage):
    run = tmp_path / "damaged"
    shutil.copytree(ckpt.checkpoint_dir(reference_run), run / "checkpoints")
    path = ckpt.latest(run)
    victim = sorted(path.glob("*.distcp"))[0]
    damage(victim)
    return run, path, victim


def test_truncated_checkpoint_is_refused(reference_run, tmp_path):
    def truncate(f):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])

    run, path, victim = damaged_copy(reference_run, tmp_path, truncate)
    with pytest.raises(ckpt.CheckpointError, match=f"{victim.name} has .*truncated"):
        ckpt.verify(path)
    out = launch(4, run, *FOLD4, *DETERMINISTIC, check=False)
    assert out.returncode != 0
    assert victim.name in out.stderr and "not loaded" in out.stderr


def test_missing_checkpoint_file_is_refused(reference_run, tmp_path):
    run, path, victim = damaged_copy(reference_run, tmp_path, lambda f: f.unlink())
    with pytest.raises(ckpt.CheckpointError, match=f"missing {victim.name}"):
        ckpt.verify(path)


def test_unfinished_checkpoint_is_ignored(reference_run, tmp_path):
    run = tmp_path / "crashed"
    shutil.copytree(ckpt.checkpoint_dir(reference_run), run / "checkpoints")
    newest = ckpt.latest(run)
    os.rename(newest, newest.with_name(newest.name + ".tmp"))  # as a crash mid-write leaves it
    assert ckpt.latest(run).name == "step-00000004"


def test_invalid_configs_fail_before_training(tmp_path):
    cases = [
        (["--training.bogus", "1"], "training.bogus"),
        (["--fold.tp", "3"], "fold"),
        (["--training.global_batch", "3"], "training.global_batch"),
    ]
    for args, key in cases:
        cmd = [sys.executable, "-m", "foldmesh.train", *SMALL, "--checkpoint.dir",
               str(tmp_path), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "WORLD_SIZE": "8"})
        assert out.returncode == 2, out.stderr
        assert key in out.stderr, out.stderr
        assert not (tmp_path / "metrics.jsonl").exists()


def test_demo_config_learns(tmp_path):
    """The README's demo (configs/demo.toml: 8 ranks, TP2 CP2 DP2 / EP4 ETP2), shortened:
    the loss falls by a clear margin, and the checkpoint and plots are written."""
    run = tmp_path / "demo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8",
           "--master-port", str(free_port()), "-m", "foldmesh.train",
           "--config", str(Path(__file__).parents[2] / "configs" / "demo.toml"),
           "--training.steps", "30", "--optimizer.warmup_steps", "10",
           "--training.val_every", "30", "--checkpoint.dir", str(run),
           "--metrics.progress", "false", "--metrics.log_every", "5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-6000:]
    curve = losses(run)
    first, last = curve[min(curve)], curve[max(curve)]
    assert last < first - 1.0, curve  # from ~ln(256) = 5.5 for random bytes
    assert ckpt.latest(run).name == "step-00000030"
    for png in ("loss.png", "throughput.png", "expert_load.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def single(run_dir: Path, *args: str):
    """One process, no torchrun: the debug preset's fold is all 1."""
    cmd = [sys.executable, "-m", "foldmesh.train", "--preset", "debug", "--checkpoint.dir",
           str(run_dir), "--metrics.progress", "false", "--metrics.plots", "false",
           "--training.val_every", "0", "--data.max_bytes", "200000",
           "--metrics.log_every", "1", *args]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    out = single(tmp_path / "nan", "--optimizer.lr", "1e30", "--optimizer.warmup_steps", "1",
                 "--optimizer.grad_clip", "0", "--training.steps", "4")
    assert out.returncode != 0
    assert "non-finite" in out.stderr and "step 2" in out.stderr, out.stderr[-3000:]


def test_nonfinite_steps_are_skipped_when_asked(tmp_path):
    run = tmp_path / "skip"
    out = single(run, "--optimizer.lr", "1e30", "--optimizer.warmup_steps", "1",
                 "--optimizer.grad_clip", "0", "--training.steps", "4",
                 "--training.on_nonfinite", "skip")
    assert out.returncode == 0, out.stderr[-3000:]
    assert any(e.startswith("skipped step") for e in events(run))


def test_accumulation_matches_one_big_batch_and_exports(tmp_path):
    whole = single(tmp_path / "whole", "--training.steps", "3", "--training.deterministic",
                   "true")
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "accumulated"
    acc = single(run, "--training.steps", "3", "--training.deterministic", "true",
                 "--training.micro_batch", "2", "--checkpoint.export_hf", "true")
    assert acc.returncode == 0, acc.stderr[-3000:]
    a, b = losses(tmp_path / "whole"), losses(run)
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-5) for k in a)
    from foldmesh import from_pretrained

    model = from_pretrained(run / "hf")  # the exported Hugging Face directory loads back
    assert model.config.vocab_size == 256


def test_bf16_compute_runs(tmp_path):
    """bf16 parameters in compute (FSDP mixed precision), fp32 weights and reductions: the
    GPU default, here on CPU so that the path is exercised without a GPU."""
    run = tmp_path / "bf16"
    out = single(run, "--training.steps", "4", "--training.dtype", "bf16")
    assert out.returncode == 0, out.stderr[-3000:]
    curve = losses(run)
    assert sorted(curve) == [1, 2, 3, 4] and all(math.isfinite(v) for v in curve.values())
