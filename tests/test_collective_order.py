"""Every rank of every process group issues the same collectives in the same order.

The real trainer runs one step on 8 gloo ranks under ``CollectiveCounter`` for drawn folds
(pp 1 and 2, FSDP2 or replication, activation checkpointing on or off, static routing so
that every rank's all-to-all sizes agree), every rank reports its sequence per group, and
``foldmesh.testing.order_mismatches`` must find nothing. A deliberately reordered or
shortened rank, and unmatched point-to-point traffic, must be found.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foldmesh.testing import RankPool, folds, group_sequences, order_mismatches
from foldmesh.train import load_config, validate_config

WORLD = 8
SMALL = ["--preset", "demo", "--model.overrides.num_layers", "2",
         "--model.overrides.hidden_size", "32", "--model.overrides.expert_ffn_size", "32",
         "--model.overrides.capacity_factor", "1.0", "--model.overrides.pad_to_capacity",
         "true", "--data.seq_len", "32", "--data.max_bytes", "100000",
         "--training.global_batch", "8", "--training.device", "cpu",
         "--training.val_every", "0", "--checkpoint.every", "0",
         "--checkpoint.resume", "false", "--metrics.progress", "false",
         "--metrics.plots", "false"]


def sequences(args) -> dict:
    from foldmesh.testing import CollectiveCounter
    from foldmesh.train.trainer import Trainer

    trainer = Trainer(load_config(args))
    try:
        trainer.train_step()  # a pipeline's first step also exchanges a P2P warm-up
        counter = CollectiveCounter(trainer.fm)
        with counter:
            trainer.train_step()
    finally:
        trainer.log.close()
    trainer.fm.destroy()
    return group_sequences(counter)


@pytest.fixture(scope="module")
def pool():
    with RankPool(WORLD, timeout=180) as p:
        yield p


@settings(max_examples=2, deadline=None, database=None)
@given(fold=folds(WORLD, pp=(1, 2), max_tp=2), dp=st.sampled_from(["fsdp", "replicate"]),
       ac=st.sampled_from(["none", "full"]))
def test_every_group_issues_the_same_sequence(pool, tmp_path_factory, fold, dp, ac):
    args = [*SMALL, "--fold.tp", str(fold.tp), "--fold.cp", str(fold.cp),
            "--fold.ep", str(fold.ep), "--fold.etp", str(fold.etp), "--fold.pp", str(fold.pp),
            "--fold.data_parallel", dp, "--fold.activation_checkpoint", ac,
            "--training.micro_batch", "1" if fold.pp > 1 else "0",
            "--checkpoint.dir", str(tmp_path_factory.mktemp("run"))]
    validate_config(load_config(args), WORLD)
    per_rank = pool.run(sequences, args)
    assert any(len(g) > 1 for g in per_rank[0]), per_rank[0]  # something was exchanged
    assert order_mismatches(per_rank) == []


def test_a_reordered_or_short_rank_is_found():
    g, pair = (0, 1, 2, 3), (0, 4)
    good = [("all_gather", 64), ("all_to_all", 128), ("reduce_scatter", 256)]
    per_rank = [{g: list(good)} for _ in range(4)] + [{}] * 4
    per_rank[0][pair] = [("send", 32), ("recv", 16)]
    per_rank[4] = {pair: [("recv", 32), ("send", 16)]}
    assert order_mismatches(per_rank) == []
    swapped = [dict(s) for s in per_rank]
    swapped[2] = {g: [good[1], good[0], good[2]]}
    assert order_mismatches(swapped) == [
        "group (0, 1, 2, 3): rank 2 differs from rank 0 (call 0: ('all_gather', 64) vs "
        "('all_to_all', 128))"]
    short = [dict(s) for s in per_rank]
    short[3] = {g: good[:2]}
    assert "3 vs 2 calls" in order_mismatches(short)[0]
    resized = [dict(s) for s in per_rank]
    resized[1] = {g: [good[0], ("all_to_all", 96), good[2]]}
    assert order_mismatches(resized) and order_mismatches(resized, bytes=False) == []
    lost = [dict(s) for s in per_rank]
    lost[4] = {pair: [("send", 16)]}
    assert order_mismatches(lost) == [
        "group (0, 4): rank 0's sends are not rank 4's receives (1 vs 0 calls)"]
