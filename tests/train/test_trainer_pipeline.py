"""The trainer with pipeline parallelism, launched with torchrun on gloo ranks.

pp = 2 on 8 ranks gives the losses, validation losses and expert loads of the same run with
pp = 1 on the 4 ranks of one stage (same per-stage fold, so the same initial weights);
checkpoints move between pp = 2 and pp = 1 (and to another schedule); a killed rank of a
pp = 2 run is recovered; the Hugging Face export of a pp run equals the pp = 1 run's.
"""

import json
import shutil

import pytest
import torch
from test_trainer import events, launch, losses

from foldmesh.hf import from_pretrained
from foldmesh.train import checkpoint as ckpt

# one stage's fold: attention TP2 DP2, MoE EP4 (ETP1 EDP1); four layers, two micro-batches
STAGE = ["--fold.tp", "2", "--fold.cp", "1", "--fold.ep", "4", "--fold.etp", "1",
         "--model.overrides.num_layers", "4", "--training.micro_batch", "2"]
PP2 = [*STAGE, "--fold.pp", "2", "--fold.pp_schedule", "1F1B"]
RUN = ["--training.deterministic", "true", "--training.steps", "6", "--checkpoint.every", "3",
       "--checkpoint.keep", "3", "--training.val_every", "3", "--training.val_batches", "1"]


def records(run_dir, kind):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == kind:
            out[rec["step"]] = rec
    return out


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pp2")
    launch(8, run, *PP2, *RUN, "--checkpoint.export_hf", "true")
    return run


@pytest.fixture(scope="module")
def pp1_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pp1")
    launch(4, run, *STAGE, *RUN, "--checkpoint.export_hf", "true")
    return run


def test_pipeline_gives_the_losses_and_expert_loads_of_pp1(pp2_run, pp1_run):
    got, want = records(pp2_run, "train"), records(pp1_run, "train")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
        assert got[step]["aux_loss"] == pytest.approx(want[step]["aux_loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-4), step
        # the router counts of every layer, summed over the step's micro-batches and ranks:
        # no extra (shape-inference) forward, every stage's layers reach rank 0
        assert got[step]["experts"] == want[step]["experts"], step
    assert len(want[1]["experts"]) == 4
    val_got, val_want = records(pp2_run, "val"), records(pp1_run, "val")
    assert sorted(val_got) == sorted(val_want) == [3, 6]
    for step in val_want:
        assert val_got[step]["val_loss"] == pytest.approx(val_want[step]["val_loss"], rel=1e-5)


def test_hf_export_of_a_pipeline_run(pp2_run, pp1_run):
    files = sorted(p.name for p in (pp2_run / "hf").iterdir())
    assert "model.safetensors.index.json" in files  # each stage wrote its own shard
    ours, ref = from_pretrained(pp2_run / "hf"), from_pretrained(pp1_run / "hf")
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def resumed(src_run, step, tmp_path):
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    src = ckpt.checkpoint_dir(src_run) / f"step-{step:08d}"
    shutil.copytree(src, run / "checkpoints" / src.name)
    return run


def test_pp2_checkpoint_resumes_with_pp1(pp2_run, tmp_path):
    run = resumed(pp2_run, 3, tmp_path)
    launch(4, run, *STAGE, *RUN, "--training.stop_after", "1",
           "--fold.data_parallel", "replicate")
    assert any("resumed from" in e for e in events(run))
    want, got = losses(pp2_run)[4], losses(run)[4]
    assert got == pytest.approx(want, rel=1e-4), (got, want)


def test_pp1_checkpoint_resumes_with_pp2_on_another_schedule(pp1_run, tmp_path):
    run = resumed(pp1_run, 3, tmp_path)
    # four stages of one layer each, two per rank, interleaved
    launch(8, run, *STAGE, *RUN, "--fold.pp", "2", "--fold.pp_schedule", "Interleaved1F1B",
           "--fold.pp_stages_per_rank", "2", "--training.stop_after", "1")
    want, got = losses(pp1_run)[4], losses(run)[4]
    assert got == pytest.approx(want, rel=1e-4), (got, want)


def test_killed_rank_of_a_pipeline_is_recovered(tmp_path):
    run = tmp_path / "fault"
    out = launch(8, run, *PP2, "--training.steps", "4", "--checkpoint.every", "2",
                 "--training.fail_at_step", "3", restarts=1)
    assert "fault injection" in out.stdout + out.stderr
    assert any("resumed from" in e and "step 2" in e for e in events(run))
    assert sorted(losses(run)) == list(range(1, 5))
    assert ckpt.latest(run).name == "step-00000004"
