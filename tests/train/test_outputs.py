"""The run's outputs beyond metrics.jsonl: TensorBoard event files holding metrics.jsonl's
values, one readable profiler trace per rank for exactly the profiled steps, greedy text
from the trained checkpoint with ``python -m foldmesh.generate``, and the configuration
errors of these settings.

One short torchrun launch (2 ranks: attention TP2, MoE EP2) serves every test that needs a
run; the rest is in-process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import TIMEOUT, launch

from foldmesh.train import ConfigError, load_config, validate_config
from foldmesh.train import _dashboards as dashboards
from foldmesh.train.metrics import MetricsLogger

FOLD2 = ["--fold.tp", "2", "--fold.cp", "1", "--fold.ep", "2", "--fold.etp", "1"]
RUN = ["--training.steps", "4", "--training.val_every", "2", "--training.val_batches", "1",
       "--checkpoint.every", "0", "--metrics.tensorboard", "true",
       "--metrics.profile_steps", "[2, 3]", "--checkpoint.export_hf", "true"]
TRAIN_KEYS = ("loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
              "peak_mem_gib", "step_time_s")


def event_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value of every scalar in the event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def expected_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value, from metrics.jsonl's train and val records."""
    out: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        pairs = []
        if rec["kind"] == "train":
            pairs = [(k, rec[k]) for k in TRAIN_KEYS]
            for layer, stats in rec["experts"].items():
                pairs += [(f"experts/L{layer}/{k}", stats[k]) for k in ("max_over_mean",
                                                                        "dropped")]
        elif rec["kind"] == "val":
            pairs = [("val_loss", rec["val_loss"])]
        for tag, v in pairs:
            if v is not None:
                out.setdefault(tag, {})[rec["step"]] = v
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path_factory.mktemp("outputs") / "run"
    launch(2, run_dir, *FOLD2, *RUN)
    return run_dir


def test_tensorboard_holds_the_metrics_jsonl_values(run):
    got, want = event_scalars(run / "tensorboard"), expected_scalars(run)
    assert "experts/L1/max_over_mean" in want and "val_loss" in want  # the run logged them
    assert sorted(want["loss"]) == [1, 2, 3, 4] and sorted(want["val_loss"]) == [2, 4]
    assert set(got) == set(want)  # None values (no MFU on CPU) are left out, not zeros
    for tag, steps in want.items():
        assert set(got[tag]) == set(steps), tag
        for step, v in steps.items():
            assert got[tag][step] == pytest.approx(v, rel=1e-6, abs=1e-30), (tag, step)
    # rank 0 alone writes events
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_each_rank_writes_a_trace_of_the_profiled_steps(run):
    for rank in range(2):
        trace = json.loads((run / "profile" / f"rank{rank}.json").read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        steps = sorted(n for n in names if isinstance(n, str) and n.startswith("foldmesh step"))
        assert steps == ["foldmesh step 2", "foldmesh step 3"], steps
    # CPU: no CUDA allocator, so metrics.memory_snapshot would be skipped; none was asked for
    assert sorted(p.name for p in (run / "profile").iterdir()) == ["rank0.json", "rank1.json"]


def test_generate_prints_the_continuation(run):
    cmd = [sys.executable, "-m", "foldmesh.generate", "--run", str(run), "--prompt",
           "def main(", "--tokens", "12", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "12 tokens after a 9-token prompt" in out.stderr
    assert "step-00000004" in out.stderr  # the newest checkpoint
    text = out.stdout[:-1]  # one newline after the continuation
    # 12 bytes: 12 characters of ASCII, fewer where bytes form a multi-byte character
    assert 3 <= len(text) <= 12 and out.stdout.endswith("\n"), repr(out.stdout)


def test_generate_loads_the_trained_weights(run):
    """The single-process model from the checkpoint gives the validation loss the 2-rank
    run logged after its last step (the same weights, batch 0 of the validation split)."""
    from foldmesh.generate import load_run
    from foldmesh.train.data import build_data

    model, cfg, path = load_run(run)
    assert path.name == "step-00000004" and not model.training
    _, val = build_data(cfg.data, cfg.training.global_batch, cfg.training.seed)
    rows = val.batch(0)
    with torch.no_grad():
        logits = model(rows[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
    logged = expected_scalars(run)["val_loss"][4]
    assert float(loss) == pytest.approx(logged, rel=1e-4)


def test_generate_from_the_hf_export_gives_the_same_text(run, capsys):
    """The run's Hugging Face export (``--hf``) holds the checkpoint's weights: the same
    greedy continuation as ``--run``."""
    from foldmesh.generate import main

    texts = []
    for source in (["--run", str(run)], ["--hf", str(run / "hf")]):
        assert main([*source, "--prompt", "import os\n", "--tokens", "8", "--device",
                     "cpu"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > 1, texts


def test_generate_errors_name_the_argument(run, tmp_path, capsys):
    from foldmesh.generate import main

    cases = [
        (["--run", str(run), "--checkpoint", "3"], "no complete checkpoint of step 3; it "
                                                   "has steps [4]"),
        (["--run", str(tmp_path)], "config.toml does not exist"),
        (["--run", str(run), "--prompt", ""], "--prompt is empty"),
        (["--run", str(run), "--tokenizer", str(tmp_path / "none.json")], "does not exist"),
        (["--hf", str(run / "hf"), "--checkpoint", "4"], "--checkpoint STEP picks"),
    ]
    for args, message in cases:
        argv = args if "--prompt" in args else [*args, "--prompt", "x"]
        assert main([*argv, "--device", "cpu"]) == 2, args
        assert message in capsys.readouterr().err, args


# ---------------------------------------------------------------------------- in-process
class FakeSink:
    def __init__(self):
        self.calls = []

    def open(self, start_step):
        self.calls.append(("open", start_step))

    def log(self, step, values):
        self.calls.append(("log", step, values))

    def close(self):
        self.calls.append(("close",))


def test_metrics_logger_feeds_its_sinks(tmp_path):
    sink = FakeSink()
    log = MetricsLogger(tmp_path, 10, progress=False, sinks=[sink])
    log.start_step = 6  # a resumed run sets it after the logger exists
    log.log_event(6, "resumed")
    log.log_train({"step": 7, "loss": 2.0, "aux_loss": None, "lr": 1e-3, "mfu": None,
                   "experts": {"0": {"counts": [1, 3], "max_over_mean": 1.5, "dropped": 0.0}}})
    log.log_val(7, 2.5)
    log.close()
    assert sink.calls == [
        ("open", 6),
        ("log", 7, {"loss": 2.0, "lr": 1e-3, "experts/L0/max_over_mean": 1.5,
                    "experts/L0/dropped": 0.0}),
        ("log", 7, {"val_loss": 2.5}),
        ("close",),
    ]
    # ranks other than 0 get no sinks, and a disabled logger ignores any it is given
    quiet = FakeSink()
    other = MetricsLogger(tmp_path / "r1", 10, enabled=False, sinks=[quiet])
    other.log_val(7, 2.5)
    other.close()
    assert quiet.calls == []
    assert dashboards.open_dashboards(_cfg("--metrics.tensorboard", "true"), False) == []


def test_tensorboard_resume_replaces_the_repeated_steps(tmp_path):
    pytest.importorskip("tensorboard")
    first = dashboards.TensorBoardSink(tmp_path)
    first.open(0)
    for step in range(1, 5):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = dashboards.TensorBoardSink(tmp_path)  # from a checkpoint of step 2
    resumed.open(2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    assert event_scalars(tmp_path / "tensorboard")["loss"] == {1: 1.0, 2: 2.0, 3: 30.0,
                                                               4: 40.0}


def _cfg(*args):
    return load_config(["--preset", "debug", "--training.steps", "4", *args])


def test_missing_dashboard_packages_fail_the_config_check(monkeypatch):
    monkeypatch.setattr(dashboards, "importable", lambda module: False)
    validate_config(_cfg(), 1)  # off by default: nothing to import
    for setting, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        with pytest.raises(ConfigError, match=f"metrics.{setting} = true .*pip install "
                                              f"{package}"):
            validate_config(_cfg(f"--metrics.{setting}", "true"), 1)


@pytest.mark.parametrize("window, message", [
    ("[0, 2]", r"metrics.profile_steps = \[0, 2\]: first = 0 must be at least 1"),
    ("[3, 2]", r"metrics.profile_steps = \[3, 2\]: last = 2 is before first = 3"),
    ("[2, 5]", r"metrics.profile_steps = \[2, 5\]: last = 5 is past .*training.steps = 4"),
    ("[2]", r"metrics.profile_steps = \[2\] must be \[first, last\]"),
])
def test_bad_profile_steps_fail_the_config_check(window, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_cfg("--metrics.profile_steps", window), 1)


def test_memory_snapshot_needs_profile_steps():
    with pytest.raises(ConfigError, match="metrics.memory_snapshot = true needs "
                                          "metrics.profile_steps"):
        validate_config(_cfg("--metrics.memory_snapshot", "true"), 1)
    validate_config(_cfg("--metrics.memory_snapshot", "true", "--metrics.profile_steps",
                         "[4, 4]"), 1)


def test_generate_reads_a_tokenizer_json(tmp_path):
    """A Hugging Face tokenizer.json goes through foldmesh.data's tokenizer; the decoded
    ids stay below its vocabulary even when the model's is larger."""
    tokenizers = pytest.importorskip("tokenizers")
    from foldmesh.generate import greedy, load_codec
    from foldmesh.models import Transformer, preset

    vocab = {"</s>": 0, "[UNK]": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    codec = load_codec(str(tmp_path))
    assert codec.vocab_size == 4 and codec.encode("hello world") == [2, 3]
    assert codec.decode([3, 2]) == "world hello"
    model = Transformer(preset("debug-mixtral")).eval()  # 64 ids
    new = greedy(model, [2, 3], 5, vocab=codec.vocab_size, context=3)
    assert len(new) == 5 and all(0 <= i < 4 for i in new)


def test_generate_picks_the_run_tokenizer(tmp_path):
    from foldmesh.generate import GenerateError, run_tokenizer
    from foldmesh.train import config_from_dict

    def cfg(**data):
        return config_from_dict({"data": data})

    assert run_tokenizer(cfg(source="stdlib")) == "bytes"
    assert run_tokenizer(cfg(source="corpus", path=str(tmp_path), tokenizer="tok.json")) \
        == "tok.json"
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"tokenizer": {"name": "/t.json"}}))
    assert run_tokenizer(cfg(source="prepared", path=str(tmp_path))) == "/t.json"
    with pytest.raises(GenerateError, match="pass --tokenizer"):
        run_tokenizer(cfg(source="tokens", path=str(tmp_path / "bin")))
