"""python -m foldmesh.plan and python -m foldmesh.train --plan: outputs and refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from foldmesh.plan.__main__ import main

ROOT = Path(__file__).parents[2]
SMALL = ["--model", "debug-mixtral", "--gpus", "8", "--global-batch", "16", "--seq-len", "64"]


def test_table_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "plan.json", tmp_path / "plan.png"
    assert main([*SMALL, "--top", "5", "--json", str(out_json), "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "attention | MoE" in text and "MFU" in text
    rows = [line for line in text.splitlines() if line[:2].strip().isdigit()]
    assert len(rows) == 5
    data = json.loads(out_json.read_text())
    assert len(data) >= 5
    for d in data:
        assert set(d["fold"]) == {"tp", "cp", "dp", "pp", "etp", "ep", "edp"}
        f = d["fold"]
        assert f["tp"] * f["cp"] * f["dp"] == f["etp"] * f["ep"] * f["edp"]
        assert f["tp"] * f["cp"] * f["dp"] * f["pp"] == 8
        assert {"fits", "memory_gib", "step_time_s", "tokens_per_s_per_gpu", "mfu"} <= set(d)
    fitting = [d for d in data if d["fits"]]
    assert fitting and all(0 < d["mfu"] < 1 for d in fitting)
    times = [d["step_time_s"] for d in fitting]
    assert times == sorted(times)  # ranked, fastest first
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_fold(capsys, tmp_path):
    out = tmp_path / "one.json"
    assert main([*SMALL, "--fold", "tp=2,ep=4,mbs=2,ac=full", "--json", str(out)]) == 0
    (d,) = json.loads(out.read_text())
    assert d["fold"] == {"tp": 2, "cp": 1, "dp": 4, "pp": 1, "etp": 1, "ep": 4, "edp": 2}
    assert d["mbs"] == 2 and d["activation_checkpoint"] == "full" and d["pp_layers"] is None
    assert main([*SMALL, "--fold", "tp=2,ep=4,pp=2,layers=1+1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["pp_layers"] == [1, 1]


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope", "--gpus", "8"], "--model 'nope' is not a model preset"),
    ([*SMALL, "--gpu", "tpu9"], "--gpu 'tpu9' is not a GPU preset"),
    ([*SMALL, "--fold", "tp2"], "cannot parse 'tp2'"),
    ([*SMALL, "--fold", "tp=x"], "tp='x' is not an integer"),
    ([*SMALL, "--fold", "tp=3"], "does not fit --gpus 8"),
    ([*SMALL, "--fold", "tp=2,ep=3"], "does not fit --gpus 8"),
    ([*SMALL, "--fold", "ep=16,tp=1,pp=1,edp=1,dp=8"], "does not fit --gpus 8"),
    ([*SMALL, "--fold", "tp=2,ep=4,pp=2,layers=1+x"], "joined by '+'"),
    ([*SMALL, "--fold", "tp=2,ep=4,pp=2,layers=1+2+3"], "give 2 counts"),
    ([*SMALL, "--fold", "tp=2,ep=4,layers=2"], "but pp = 1"),
    ([*SMALL, "--set", "peak_flops=abc"], "must be a number"),
    ([*SMALL, "--mbs", "1,x"], "--mbs '1,x'"),
    ([*SMALL, "--global-batch", "0"], "global_batch must be a positive int"),
    ([*SMALL, "--dry-run"], "--dry-run needs --fold"),
    ([*SMALL, "--dry-run", "--fold", "tp=2,ep=4", "--rank", "8"], "rank 8"),
    ([*SMALL, "--set", "warp_speed=1"], "unknown hardware settings"),
    (["--model", "mixtral-8x22b", "--gpus", "8", "--gpu", "a100"], "no layout fits"),
])
def test_bad_requests_name_the_setting(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_nothing_fits_names_the_term_and_a_gpu_count(capsys):
    assert main(["--model", "mixtral-8x22b", "--gpus", "8", "--gpu", "a100", "--mbs", "1"]) == 2
    err = capsys.readouterr().err
    assert "most of it" in err and "GPUs would fit" in err


def test_train_plan_prints_the_configs_estimate():
    run = subprocess.run(
        [sys.executable, "-m", "foldmesh.train", "--config", "configs/demo.toml", "--plan",
         "8", "--plan-gpu", "a100"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "tp2 cp2 dp2 pp1 | etp2 ep4 edp1" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "foldmesh.train", "--config", "configs/demo.toml", "--plan",
         "6"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "world size 6" in bad.stderr


def test_models_from_a_trainer_config_and_hardware_from_toml(tmp_path, capsys):
    gpu = tmp_path / "slow_net.toml"
    gpu.write_text('preset = "h100"\nname = "H100, 100G network"\nnetwork_bandwidth = 12.5e9\n')
    out = tmp_path / "plan.json"
    argv = ["--model", str(ROOT / "configs" / "demo.toml"), "--gpus", "16", "--gpu", str(gpu),
            "--gpus-per-node", "4", "--global-batch", "16", "--seq-len", "128", "--mbs", "1",
            "--fold", "tp=2,cp=2,ep=4,etp=2", "--json", str(out)]
    assert main(argv) == 0
    (slow,) = json.loads(out.read_text())
    assert slow["fold"]["dp"] == 4 and slow["cross_node"]  # dp leaves the 4-GPU nodes
    assert main([*argv[:4], "--gpus-per-node", "4", *argv[8:]]) == 0  # the stock H100
    (fast,) = json.loads(out.read_text())
    assert slow["step_time_s"] > fast["step_time_s"]
    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "h100"\nwarp = 9\n')
    assert main([*argv[:4], "--gpu", str(bad), *argv[6:]]) == 2
    assert "unknown hardware settings ['warp']" in capsys.readouterr().err
