"""The trainer's "step time: measured X s, planner Y s" line, on CPU: step times come from
a stubbed clock and the GPU is an injected hardware preset (no timing is asserted)."""

import gc
import json
import re
import types

import pytest
import torch

from foldmesh.plan import estimate, from_train_config, hardware
from foldmesh.train import load_config
from foldmesh.train._plan_check import AT_STEP, WARMUP, PlanCheck, device_preset

SMALL = ["--preset", "demo", "--model.overrides.num_layers", "2",
         "--model.overrides.hidden_size", "64", "--model.overrides.expert_ffn_size", "64",
         "--data.seq_len", "32", "--data.max_bytes", "400000", "--training.global_batch", "8",
         "--training.val_every", "0", "--metrics.progress", "false",
         "--metrics.plots", "false", "--fold.data_parallel", "replicate", "--fold.tp", "1",
         "--fold.cp", "1", "--fold.ep", "1", "--fold.etp", "1"]
LINE = re.compile(r"step time: measured (\S+) s, planner (\S+) s \(ratio (\S+)\)")


class Events:
    """A MetricsLogger's log_event, kept."""

    def __init__(self):
        self.lines = []

    def log_event(self, step, message):
        self.lines.append((step, message))


def predicted(cfg, hw, world=1, device="cpu") -> float:
    workload, layout = from_train_config(cfg, world, device)
    return estimate(workload, layout, hw.replace(gpus_per_node=world)).step_time


CPU = torch.device("cpu")


def run_check(cfg, times, logged_at, hw=None, device=CPU):
    log = Events()
    check = PlanCheck(cfg, 1, device, log, hw=hw)
    for step, seconds in enumerate(times, 1):
        check.step_done(step, seconds)
        if step in logged_at:
            check.logged(step)
    return log.lines


@pytest.mark.parametrize("factor, flagged", [(3.0, True), (0.5, True), (1.2, False),
                                             (0.8, False)])
def test_the_line_and_the_largest_term_when_off_by_more_than_25_percent(factor, flagged):
    cfg = load_config(["--config", "configs/single_gpu.toml"])
    hw = hardware("h200")
    want = predicted(cfg, hw, device="cpu")
    # three slow warm-up steps, then steady ones around factor x the prediction
    times = [40.0, 9.0, 5.0] + [factor * want * x for x in (1.02, 0.98, 1.0, 1.01, 0.99, 1.0,
                                                            7.0)]
    lines = run_check(cfg, times, logged_at={5, 10}, hw=hw)
    assert [s for s, _ in lines] == [10] * (1 + flagged)
    measured, planner, ratio = LINE.fullmatch(lines[0][1]).groups()
    assert float(measured) == pytest.approx(factor * want, rel=5e-3)  # the steady median
    assert float(planner) == pytest.approx(want, rel=5e-3)
    assert float(ratio) == pytest.approx(factor, abs=0.01)
    if flagged:
        assert lines[1][1].startswith("step time: off by more than 25% from the planner "
                                      "(H200 SXM; compute at foldmesh's kernel rates")
        assert "its largest term is grouped GEMMs bwd (medium)" in lines[1][1]


def test_once_at_the_first_logged_step_from_the_tenth_without_profiled_steps():
    cfg = load_config([*SMALL, "--metrics.profile_steps", "[9, 11]"])
    hw = hardware("h100")
    want = predicted(cfg, hw)
    times = [9.0] * WARMUP + [want] * 5 + [50.0] * 3 + [want] * 5  # 9-11 profiled (slow)
    lines = run_check(cfg, times, logged_at={4, 8, 12, 16}, hw=hw)
    assert AT_STEP == 10 and [s for s, _ in lines] == [12]
    assert float(LINE.fullmatch(lines[0][1]).group(3)) == 1.0
    # a window covering every steady step: the check waits for an unprofiled one
    cfg = load_config([*SMALL, "--metrics.profile_steps", f"[{WARMUP + 1}, 12]"])
    lines = run_check(cfg, [want] * 14, logged_at={10, 12, 13, 14}, hw=hw)
    assert [s for s, _ in lines] == [13]


def test_no_preset_no_prediction(monkeypatch):
    cfg = load_config(SMALL)
    (line,) = run_check(cfg, [1.0] * 10, logged_at={10})
    assert line == (10, "step time: measured 1 s; no planner preset for cpu, so no "
                        "prediction to compare")
    assert device_preset(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    assert device_preset(torch.device("cuda", 0)) == "h200"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H800")
    assert device_preset(torch.device("cuda", 0)) == "h100"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    (line,) = run_check(cfg, [1.0] * 10, logged_at={10}, device=torch.device("cuda", 0))
    assert "no planner preset for Tesla T4" in line[1]


@pytest.fixture
def one_rank(monkeypatch):
    """A plain one-process run (no torchrun): the trainer's in-process store; the
    environment it sets is undone afterwards."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT",
                "MASTER_ADDR", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)
    yield
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()


def test_the_trainer_logs_it_at_step_10(tmp_path, monkeypatch, one_rank):
    """A real 12-step CPU run with log_every 5: the line is in metrics.jsonl at step 10,
    measured from the stubbed clock's step times, against the injected H200's plan."""
    from foldmesh.train import trainer as trainer_module

    cfg = load_config([*SMALL, "--training.steps", "12", "--metrics.log_every", "5",
                       "--checkpoint.dir", str(tmp_path)])
    hw = hardware("h200")
    want = predicted(cfg, hw)
    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(trainer_module, "time",
                        types.SimpleNamespace(perf_counter=lambda: clock.now))
    trainer = trainer_module.Trainer(cfg)
    trainer.plan_check.hw = hw
    step = trainer.train_step
    durations = iter([30.0, 20.0, 10.0] + [2 * want] * 9)

    def timed_step():
        out = step()
        clock.now += next(durations)
        return out

    trainer.train_step = timed_step
    try:
        trainer.fit()
    finally:
        trainer.log.close()
        trainer.fm.destroy()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    found = [(r["step"], r["message"]) for r in records
             if r["kind"] == "event" and r["message"].startswith("step time")]
    assert [s for s, _ in found] == [10, 10]
    measured, planner, ratio = LINE.fullmatch(found[0][1]).groups()
    assert float(measured) == pytest.approx(2 * want, rel=5e-3)
    assert float(planner) == pytest.approx(want, rel=5e-3) and ratio == "2.00"
    assert "its largest term is" in found[1][1]
