"""MetricsLogger's metrics.jsonl, read_metrics' tolerance of a crash, and foldmesh.plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from foldmesh.plot import latest_per_step, plot_run
from foldmesh.train.metrics import METRICS_FILE, MetricsLogger, read_metrics

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
TRAIN_KEYS = {"step", "loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
              "peak_mem_gib", "step_time_s", "skipped", "experts"}


def _train_record(step: int, loss: float = 3.0, n_layers: int = 2, n_exp: int = 4) -> dict:
    # Layer "1" is the unbalanced one: expert 0 takes half its tokens.
    experts = {}
    for layer in range(n_layers):
        counts = [40 + step % 3] * n_exp
        if layer == 1:
            counts[0] = 3 * sum(counts[1:]) // (n_exp - 1)
        mean = sum(counts) / n_exp
        experts[str(layer)] = {"counts": counts, "max_over_mean": max(counts) / mean,
                               "dropped": 0.01 * layer}
    return {"step": step, "loss": loss, "aux_loss": 0.01, "z_loss": None, "lr": 3e-4 * step / 10,
            "grad_norm": 1.5 / step, "tokens_per_s": 12345.0, "mfu": None, "peak_mem_gib": None,
            "step_time_s": 0.1, "skipped": False, "experts": experts}


def test_logger_writes_jsonl(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=100, progress=True) as log:
        log.log_train(_train_record(10))
        log.progress_update(10, loss=3.0, tokens_per_s=12345.0)
        log.log_val(10, 2.5)
        log.log_event(10, "skipped step 7: non-finite grad norm")
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["kind"] for r in records] == ["train", "val", "event"]
    assert TRAIN_KEYS | {"kind", "time"} <= records[0].keys()
    assert records[0]["experts"]["1"]["counts"][0] == 123
    assert records[1]["val_loss"] == 2.5
    assert records[2]["message"].startswith("skipped step 7")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    # The training line names the worst layers; None fields (mfu, memory) are left out.
    assert "step  10/100" in out[0] and "loss 3.0000" in out[0] and "(L1)" in out[0]
    assert "mfu" not in out[0] and "GiB" not in out[0]


def test_second_logger_appends(tmp_path):
    with MetricsLogger(tmp_path, 100, progress=False) as log:
        log.log_train(_train_record(1))
    with MetricsLogger(tmp_path, 100, progress=False, start_step=1) as log:
        log.log_event(1, "resumed from step 1")
        log.log_train(_train_record(2))
    assert [(r["kind"], r["step"]) for r in read_metrics(tmp_path)] == [
        ("train", 1), ("event", 1), ("train", 2)]


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    log = MetricsLogger(tmp_path / "run", 100, enabled=False)
    log.log_train(_train_record(1))
    log.log_val(1, 2.0)
    log.log_event(1, "x")
    log.progress_update(1, 2.0, 1.0)
    log.close()
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr() == ("", "")


def test_truncated_last_line_skipped(tmp_path):
    good = json.dumps({"kind": "val", "step": 1, "val_loss": 2.0})
    (tmp_path / METRICS_FILE).write_text(good + "\n" + good[:17])
    assert read_metrics(tmp_path) == [json.loads(good)]
    # A resume after the crash appends on a fresh line: only the torn record is lost.
    with MetricsLogger(tmp_path, 10, progress=False) as log:
        log.log_val(2, 1.5)
    with pytest.warns(UserWarning, match="broken record"):
        records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]


def _synthetic_run(run_dir: Path) -> None:
    """Steps 1-30, resumed from 20 (steps 21-25 written twice), val every 10 steps."""
    with MetricsLogger(run_dir, 30, progress=False) as log:
        for step in range(1, 26):
            log.log_train(_train_record(step, loss=9.0))
            if step % 10 == 0:
                log.log_val(step, 8.0)
    with MetricsLogger(run_dir, 30, progress=False, start_step=20) as log:
        log.log_event(20, "resumed from step 20")
        for step in range(21, 31):
            log.log_train(_train_record(step, loss=4.0 - step / 30))
            if step % 10 == 0:
                log.log_val(step, 3.0)


def test_latest_per_step_keeps_last(tmp_path):
    _synthetic_run(tmp_path)
    train = latest_per_step(read_metrics(tmp_path), "train")
    assert [r["step"] for r in train] == list(range(1, 31))
    assert all(r["loss"] < 4 for r in train if r["step"] > 20)


def test_plot_run_and_cli(tmp_path):
    run, empty = tmp_path / "run", tmp_path / "empty"
    _synthetic_run(run)
    empty.mkdir()
    # Both CLI runs start now and finish while plot_run works: each pays ~3 s of imports.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "foldmesh.plot"]
    cli = subprocess.Popen([*cmd, str(run), "--out", str(tmp_path / "cli")], env=env, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bad = subprocess.Popen([*cmd, str(empty)], env=env, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    written = plot_run(run)
    names = ["loss.png", "throughput.png", "expert_load.png"]
    assert written == [run / n for n in names]
    for path in written:
        assert path.read_bytes()[:8] == PNG

    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    for n in names:
        assert (tmp_path / "cli" / n).read_bytes()[:8] == PNG
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 2 and "no metrics.jsonl" in err


def test_plot_run_skips_missing_data(tmp_path, capsys):
    with MetricsLogger(tmp_path, 5, progress=False) as log:
        for step in range(1, 6):
            log.log_train({**_train_record(step), "experts": None, "grad_norm": None})
    assert [p.name for p in plot_run(tmp_path)] == ["loss.png", "throughput.png"]
    out = capsys.readouterr().out
    assert "no validation" in out and "no expert records" in out


def test_bar_only_on_a_terminal(tmp_path, monkeypatch):
    """A batch job's log (not a terminal) gets no bar; progress=False turns it off anywhere."""
    from foldmesh.train import metrics

    for terminal, progress, drawn in [(True, True, True), (True, False, False),
                                      (False, True, False)]:
        monkeypatch.setattr(metrics, "on_terminal", lambda t=terminal: t)
        with MetricsLogger(tmp_path / f"{terminal}-{progress}", 10, progress=progress) as log:
            log.progress_update(1, 2.0, 1.0)
            assert (log._bar is not None) == drawn, (terminal, progress)
