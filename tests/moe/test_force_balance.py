"""moe.force_balance: exactly equal expert counts on every layer and rank, whatever the scores.

Single-process checks of the routing rule, then the trainer on 4 gloo ranks (tp 2, the
experts over ep 2 and etp 2; every rank routes its own tokens), where each router's counts of
its rank's tokens must be exactly equal on every layer.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foldmesh.moe import Router, RouterConfig, apply_force_balance
from foldmesh.moe.router import balanced_indices
from foldmesh.testing import RankPool
from foldmesh.train import load_config


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), e=st.integers(1, 12), data=st.data())
def test_every_expert_gets_the_same_count(n, e, data):
    k = data.draw(st.integers(1, e))
    idx = balanced_indices(torch.randn(n, e), k)
    assert idx.shape == (n, k)
    # k distinct experts per token
    assert all(len(set(row)) == k for row in idx.tolist())
    counts = torch.bincount(idx.flatten(), minlength=e)
    assert counts.max() - counts.min() <= 1
    if (n * k) % e == 0:
        assert (counts == n * k // e).all()


@pytest.mark.parametrize("kw", [
    dict(),
    dict(score_function="sigmoid", expert_bias=True, normalize_topk=True, num_groups=4,
         topk_groups=2, scaling_factor=2.5),
    dict(pre_softmax=True, aux_loss_coeff=0.01, z_loss_coeff=1e-3),
])
def test_router_ignores_scores_but_weights_and_gradients_follow(kw):
    cfg = RouterConfig(hidden_size=16, num_experts=8, topk=2, **kw)
    torch.manual_seed(0)
    router = Router(cfg)
    apply_force_balance(router)
    x = torch.randn(12, 16, requires_grad=True)
    out = router(x, num_sequences=None)
    assert (out.counts == 12 * 2 // 8).all()
    assert torch.equal(out.indices, balanced_indices(torch.empty(12, 8), 2))
    # the weights are the usual ones at the forced experts
    plain = Router(cfg)
    plain.load_state_dict(router.state_dict())
    scores = plain(x, num_sequences=None).scores
    assert torch.equal(out.scores, scores)
    out.probs.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


SMALL = ["--preset", "demo", "--model.overrides.num_layers", "2",
         "--model.overrides.hidden_size", "32", "--model.overrides.expert_ffn_size", "32",
         "--data.seq_len", "16", "--data.max_bytes", "100000", "--training.global_batch", "4",
         "--training.device", "cpu", "--training.val_every", "0", "--checkpoint.every", "0",
         "--checkpoint.resume", "false", "--metrics.progress", "false",
         "--metrics.plots", "false", "--moe.force_balance", "true",
         "--fold.tp", "2", "--fold.ep", "2", "--fold.etp", "2"]


def _step(args) -> dict:
    from foldmesh.moe import MoE
    from foldmesh.train.trainer import Trainer

    trainer = Trainer(load_config(args))
    try:
        trainer.train_step()
        layers = [m for p in trainer.parts for m in p.modules() if isinstance(m, MoE)]
        out = dict(rank_counts=[m.router.last_counts.tolist() for m in layers],
                   step_counts=trainer.counts.tolist() if hasattr(trainer, "counts") else None)
    finally:
        trainer.log.close()
    trainer.fm.destroy()
    return out


def test_trainer_routes_exactly_evenly_on_every_layer_and_rank(tmp_path):
    with RankPool(4, timeout=120) as pool:
        results = pool.run(_step, [*SMALL, "--checkpoint.dir", str(tmp_path)])
    for rank, got in enumerate(results):
        assert len(got["rank_counts"]) == 2
        for layer in got["rank_counts"]:
            assert len(set(layer)) == 1 and layer[0] > 0, (rank, got)
    events = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "force_balance" in line]
    assert len(events) == 1 and "benchmarking only" in events[0]
