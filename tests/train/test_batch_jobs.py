"""The trainer as a batch job runs it: one process without torchrun, output to a file.

Two one-process runs share a machine (no fixed rendezvous port), a set MASTER_PORT is still
the one used, and a log captured to a file holds the log lines only, no progress-bar frames.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

STEPS = 4
ARGS = ["--preset", "debug", "--metrics.plots", "false", "--training.val_every", "0",
        "--data.max_bytes", "200000", "--metrics.log_every", "1",
        "--training.steps", str(STEPS), "--checkpoint.every", "0"]


def _start(run_dir: Path, log: Path, env: dict) -> subprocess.Popen:
    # progress is left at its default (on): only the file output turns the bar off.
    cmd = [sys.executable, "-m", "foldmesh.train", *ARGS, "--checkpoint.dir", str(run_dir)]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_two_single_process_runs_share_a_machine_and_log_plain_lines(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start(r, log, _env()) for r, log in zip(runs, logs, strict=True)]
    for p, log in zip(procs, logs, strict=True):
        assert p.wait(timeout=300) == 0, log.read_text()[-3000:]
    for run, log in zip(runs, logs, strict=True):
        text = log.read_bytes().decode()  # read_text() would turn "\r" into "\n"
        assert "\r" not in text, text[-2000:]
        steps = [int(m) for m in re.findall(rf"^step +(\d+)/{STEPS} \| loss", text, re.M)]
        assert steps == list(range(1, STEPS + 1)), text[-2000:]
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["kind"] == "train"] == steps


def test_a_set_master_port_is_used(tmp_path):
    # A port that is already taken: the run must try to listen on it and say so.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        log = tmp_path / "log"
        p = _start(tmp_path / "run", log, _env(MASTER_PORT=str(port)))
        assert p.wait(timeout=300) != 0
    text = log.read_text()
    assert str(port) in text and "EADDRINUSE" in text, text[-3000:]
