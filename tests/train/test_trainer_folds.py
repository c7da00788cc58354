"""One training step of the real ``Trainer`` on 8 gloo ranks, for many folds.

test_trainer.py launches whole runs with torchrun, a few seconds each, so it covers a handful
of folds. Here one ``RankPool`` serves the module and every rank builds a ``Trainer`` from a
``TrainConfig`` (``init_distributed`` joins the pool's process group), runs one fp32
``train_step`` and reports the loss and gradient norm. Folds are drawn by hypothesis (pp = 1
and pp = 2, the latter with the 1F1B pipeline over two micro-batches) with both data-parallel
modes, and the folds where the experts' data-parallel group is neither
trivial nor the dense one (edp > 1 and edp != dp*cp) are pinned: there FSDP2 divides expert
gradients by dp*cp rather than by its mesh size, which it would do with a pre-multiplied sum
(NCCL's PreMulSum) that gloo does not have.
"""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foldmesh import Fold
from foldmesh.testing import RankPool, folds
from foldmesh.train import TrainConfig, load_config, validate_config

WORLD = 8
# The demo preset's model shrunk to one MoE block (num_heads 8, num_kv_heads 4, num_experts 8 as
# in the preset): every size divides tp <= 4 and ep, etp <= 8, and a step takes 1-3 s on 2 cores.
SMALL = ["--preset", "demo",
         "--model.overrides.hidden_size", "64", "--model.overrides.expert_ffn_size", "64",
         "--data.seq_len", "32", "--data.max_bytes", "200000", "--training.global_batch", "8",
         "--training.device", "cpu", "--training.dtype", "fp32", "--training.val_every", "0",
         "--checkpoint.every", "0", "--checkpoint.resume", "false",
         "--metrics.progress", "false", "--metrics.plots", "false"]
MAX_TP = 4  # num_kv_heads = 4
START_LOSS = math.log(256)  # byte-level data, small random weights: near-uniform predictions

# edp > 1 and edp != dp*cp: FSDP2's expert groups need a divide factor that is not their size
PINNED = [
    Fold(tp=2, cp=1, ep=4, etp=1),  # dp=4 edp=2: the fold that crashed with PREMUL_SUM
    Fold(tp=1, cp=2, ep=2, etp=2),  # dp=4 cp=2 edp=2
    Fold(tp=1, cp=1, ep=2, etp=1),  # dp=8 edp=4
    Fold(tp=4, cp=1, ep=2, etp=1),  # dp=2 edp=4: edp larger than dp*cp
    Fold(pp=2, tp=1, cp=1, ep=2, etp=1),  # per stage dp=4 edp=2, through the pipeline
    Fold(pp=2, tp=2, cp=1, ep=1, etp=1),  # per stage dp=2 edp=4, tp=2 in each stage
]


@pytest.fixture(scope="module")
def pool():
    with RankPool(WORLD, timeout=120) as p:
        yield p


def make_config(fold: Fold, data_parallel: str, run_dir) -> TrainConfig:
    """The trainer's config for ``fold``, as ``python -m foldmesh.train`` would build it: one
    layer per pipeline stage, and with pp > 1 two micro-batches per step (1F1B needs as many
    micro-batches as stages)."""
    rows = 8 // fold.resolve(WORLD).dp
    micro = rows // 2 if fold.pp > 1 else 0
    cfg = load_config([*SMALL, "--model.overrides.num_layers", str(fold.pp),
                       "--training.micro_batch", str(micro),
                       "--fold.tp", str(fold.tp), "--fold.cp", str(fold.cp),
                       "--fold.ep", str(fold.ep), "--fold.etp", str(fold.etp),
                       "--fold.pp", str(fold.pp), "--fold.data_parallel", data_parallel,
                       "--checkpoint.dir", str(run_dir)])
    validate_config(cfg, WORLD)
    return cfg


def one_step(cfg: TrainConfig) -> tuple[float, float, tuple[int, int]]:
    """On every rank: build the Trainer, run one step, release its process groups."""
    from foldmesh.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        out = trainer.train_step()
    finally:
        trainer.log.close()
    f = trainer.fm.fold
    trainer.fm.destroy()  # each gloo group holds threads and sockets: do not let them pile up
    return out["loss"], out["grad_norm"], (f.dp, f.edp)


def check(pool, fold: Fold, data_parallel: str, run_dir) -> tuple[float, float]:
    """One step on every rank; return the (loss, grad norm) every rank agrees on."""
    cfg = make_config(fold, data_parallel, run_dir)
    results = pool.run(one_step, cfg)
    resolved = fold.resolve(WORLD)
    for rank, (loss, norm, degrees) in enumerate(results):
        assert degrees == (resolved.dp, resolved.edp), (rank, degrees, resolved)
        assert math.isfinite(loss) and math.isfinite(norm), (rank, loss, norm)
        assert norm > 0, (rank, norm)
    loss, norm = results[0][:2]
    # the loss is averaged over the stage and the norm is global: every rank reports the same
    for rank, (other_loss, other_norm, _) in enumerate(results):
        assert other_loss == pytest.approx(loss, rel=1e-6), (rank, other_loss, loss)
        assert other_norm == pytest.approx(norm, rel=1e-6), (rank, other_norm, norm)
    assert abs(loss - START_LOSS) < 0.5, loss
    return loss, norm


@pytest.mark.parametrize("fold", PINNED, ids=repr)
def test_fsdp_step_matches_replicated_step(pool, fold, tmp_path):
    """Both data-parallel modes on a fold with edp > 1 and edp != dp*cp: FSDP2 runs (no
    PREMUL_SUM on gloo) and, from the same weights and batch, gives the replicated weights'
    loss and gradient norm (expert gradients divided by dp*cp, not by edp)."""
    resolved = fold.resolve(WORLD)
    assert resolved.edp > 1 and resolved.edp != resolved.dp * resolved.cp, resolved
    loss, norm = check(pool, fold, "fsdp", tmp_path / "fsdp")
    want_loss, want_norm = check(pool, fold, "replicate", tmp_path / "replicate")
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert norm == pytest.approx(want_norm, rel=1e-5)


@settings(max_examples=10, deadline=None, database=None)  # database: write nothing to the repo
@given(fold=folds(WORLD, pp=(1, 2), max_tp=MAX_TP),
       data_parallel=st.sampled_from(["fsdp", "replicate"]))
def test_one_step_on_any_fold(pool, tmp_path_factory, fold, data_parallel):
    check(pool, fold, data_parallel, tmp_path_factory.mktemp("run"))
