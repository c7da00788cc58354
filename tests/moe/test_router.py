"""Router: routing and losses against plain references, and the sharding invariant.

The references below are written independently of foldmesh/moe/router.py: routing with Python
floats and sorted(), losses with loops over experts and sequences (autograd in fp64 gives the
reference gradient). Dimension legend: N tokens, H hidden, E experts, k top-k, B sequences,
R simulated ranks per data-parallel replica.
"""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foldmesh.moe import Reductions, Router, RouterConfig

H = 6
FAST = settings(max_examples=40, deadline=None)
LOSS_KEYS = ("aux_loss", "seq_aux_loss", "global_aux_loss", "z_loss")


# ----------------------------------------------------------------------------- references
def ref_route(row: list[float], cfg: RouterConfig, bias: list[float] | None):
    """Chosen experts (best first) and their weights for one token's logits."""
    e_, k = cfg.num_experts, cfg.topk
    if cfg.score_function == "softmax":
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        scores = [v / sum(ex) for v in ex]
        base = scores if cfg.pre_softmax else row
    else:
        scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
        base = scores
    sel = [base[e] + (bias[e] if bias is not None else 0.0) for e in range(e_)]
    allowed = list(range(e_))
    if cfg.num_groups is not None:
        g, gs = cfg.num_groups, e_ // cfg.num_groups
        mode = cfg.group_score
        if mode == "auto":
            mode = "top2" if cfg.score_function == "sigmoid" and bias is not None else "max"
        take = {"max": 1, "top2": min(2, gs), "topk_share": k // cfg.topk_groups}[mode]
        group_score = [sum(sorted(sel[i * gs:(i + 1) * gs], reverse=True)[:take])
                       for i in range(g)]
        kept = sorted(range(g), key=lambda i: -group_score[i])[:cfg.topk_groups]
        allowed = [e for e in range(e_) if e // gs in kept]
    chosen = sorted(allowed, key=lambda e: -sel[e])[:k]
    w = [base[e] for e in chosen]
    if cfg.score_function == "softmax" and not cfg.pre_softmax:
        m = max(w)
        w = [math.exp(v - m) for v in w]
        w = [v / sum(w) for v in w]
    if cfg.normalize_topk:
        s = sum(w)
        w = [v / (s + 1e-20) for v in w]
    return chosen, [v * cfg.scaling_factor for v in w]


def ref_indices(x, w, cfg, bias):
    logits = (x.float() @ w.float().T).double()
    b = None if bias is None else bias.tolist()
    return [ref_route(row, cfg, b)[0] for row in logits.tolist()]


def ref_balance(p, idx, cfg, coeff):
    """coeff * E / (k T^2) * sum_e P_e c_e over one set of tokens (p [T, E], idx T lists)."""
    t, e_ = p.shape
    c = [sum(e in chosen for chosen in idx) for e in range(e_)]
    return coeff * e_ / (cfg.topk * t * t) * sum(p[:, e].sum() * c[e] for e in range(e_))


def ref_losses(x, w64, cfg, idx, b):
    """Replica losses of the unsharded tokens x [B*L, H] (sequence-major), differentiable."""
    logits = x.double() @ w64.T
    if cfg.score_function == "softmax":
        p = torch.softmax(logits, -1)
    else:
        s = torch.sigmoid(logits)
        p = s / s.sum(-1, keepdim=True)
    n, out = x.shape[0], {}
    if cfg.aux_loss_coeff:
        out["aux_loss"] = ref_balance(p, idx, cfg, cfg.aux_loss_coeff)
    if cfg.seq_aux_loss_coeff:
        ln = n // b
        per_seq = [ref_balance(p[i * ln:(i + 1) * ln], idx[i * ln:(i + 1) * ln], cfg,
                               cfg.seq_aux_loss_coeff) for i in range(b)]
        out["seq_aux_loss"] = sum(per_seq) / b
    if cfg.z_loss_coeff:
        lse = [torch.log(torch.exp(logits[i]).sum()) for i in range(n)]
        out["z_loss"] = cfg.z_loss_coeff * sum(v * v for v in lse) / n
    return out, p


# ----------------------------------------------------------------------------- helpers
def make(cfg: RouterConfig, seed: int, bias_scale: float = 0.3) -> Router:
    torch.manual_seed(seed)
    r = Router(cfg)
    with torch.no_grad():
        r.weight.normal_()
        if r.expert_bias is not None:
            r.expert_bias.copy_(torch.randn(cfg.num_experts) * bias_scale)
    return r


def group_settings(draw, e, k, forced):
    if not forced and not draw(st.booleans()):
        return {}
    # Forced: at least one group is dropped, so the group score decides something.
    g = draw(st.sampled_from([d for d in (1, 2, 4, 8) if e % d == 0 and d > forced]))
    tg = draw(st.sampled_from([t for t in range(1, g + 1 - forced) if k <= t * (e // g)]))
    modes = ["auto", "max", "top2"] + (["topk_share"] if k >= tg else [])
    return {"num_groups": g, "topk_groups": tg, "group_score": draw(st.sampled_from(modes))}


@st.composite
def routing_configs(draw, grouped=False):
    e = draw(st.sampled_from([4, 8, 16]))
    k = draw(st.sampled_from([1, 2, 4] if not grouped or e > 4 else [1, 2]))
    return RouterConfig(
        hidden_size=H, num_experts=e, topk=k,
        score_function=draw(st.sampled_from(["softmax", "sigmoid"])),
        pre_softmax=draw(st.booleans()), normalize_topk=draw(st.booleans()),
        scaling_factor=draw(st.sampled_from([1.0, 2.5])), expert_bias=draw(st.booleans()),
        **group_settings(draw, e, k, int(grouped)),
    )


@st.composite
def loss_configs(draw):
    e = draw(st.sampled_from([4, 8, 16]))
    k = draw(st.sampled_from([1, 2, 4]))
    coeff = st.sampled_from([0.0, 0.01, 0.3])
    return RouterConfig(
        hidden_size=H, num_experts=e, topk=k,
        score_function=draw(st.sampled_from(["softmax", "sigmoid"])),
        pre_softmax=draw(st.booleans()), expert_bias=draw(st.booleans()),
        aux_loss_coeff=draw(coeff), seq_aux_loss_coeff=draw(coeff),
        global_aux_loss_coeff=draw(coeff), z_loss_coeff=draw(coeff),
    )


class SimulatedRanks:
    """Ranks run one after another. Pass 1 records what each rank hands to the reductions;
    pass 2 answers the i-th call of a rank with the sum, over the ranks of its group, of their
    recorded i-th inputs. Valid because the inputs (counts) never depend on the outputs."""

    def __init__(self, replica_of: list[int]):
        self.replica_of = replica_of
        self.log = [{"replica": [], "global": []} for _ in replica_of]
        self.replay = False

    def reductions(self, rank: int) -> Reductions:
        sim = self

        class Rank(Reductions):
            calls = {"replica": 0, "global": 0}

            def _sum(self, kind, t, ranks):
                i = self.calls[kind]
                self.calls[kind] += 1
                if not sim.replay:
                    sim.log[rank][kind].append(t.clone())
                    return t
                return sum(sim.log[q][kind][i] for q in ranks)

            def replica_sum(self, t):
                mine = sim.replica_of[rank]
                return self._sum("replica", t, [q for q, d in enumerate(sim.replica_of)
                                                if d == mine])

            def global_sum(self, t):
                return self._sum("global", t, range(len(sim.replica_of)))

        Rank.calls = {"replica": 0, "global": 0}
        return Rank()


# ----------------------------------------------------------------------------- routing
@FAST
@given(cfg=routing_configs(), n=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_routing_matches_reference(cfg, n, seed):
    check_routing(cfg, n, seed)


@FAST
@given(cfg=routing_configs(grouped=True), n=st.integers(8, 16), seed=st.integers(0, 2**16))
def test_group_limited_routing_matches_reference(cfg, n, seed):
    check_routing(cfg, n, seed)


def check_routing(cfg, n, seed):
    r = make(cfg, seed)
    x = torch.randn(n, H)
    out = r(x)
    assert out.probs.dtype == torch.float32 and out.indices.dtype == torch.int64
    assert out.probs.shape == out.indices.shape == (n, cfg.topk)
    logits = (x @ r.weight.detach().T).double().tolist()
    bias = None if r.expert_bias is None else r.expert_bias.tolist()
    for i, row in enumerate(logits):
        chosen, w = ref_route(row, cfg, bias)
        assert out.indices[i].tolist() == chosen
        assert out.probs[i].tolist() == pytest.approx(w, rel=1e-5, abs=1e-6)
    assert torch.equal(out.counts, torch.bincount(out.indices.flatten(), minlength=cfg.num_experts))
    full = torch.softmax if cfg.score_function == "softmax" else lambda t, dim: torch.sigmoid(t)
    torch.testing.assert_close(out.scores, full(torch.tensor(logits).float(), dim=-1))


def test_empty_input_routes_nothing():
    r = make(RouterConfig(H, 8, 2, aux_loss_coeff=0.1, z_loss_coeff=0.1,
                          seq_aux_loss_coeff=0.1, global_aux_loss_coeff=0.1), 0)
    out = r(torch.randn(0, H), num_sequences=2)
    assert out.probs.shape == (0, 2) and out.counts.sum() == 0
    assert all(v == 0 for v in r.last_losses.values())


def test_expert_bias_changes_selection_not_weight_formula():
    for score, pre in (("sigmoid", False), ("softmax", True), ("softmax", False)):
        cfg = RouterConfig(H, 8, 2, score_function=score, pre_softmax=pre, expert_bias=True)
        r = make(cfg, 1)
        x = torch.randn(16, H)
        with torch.no_grad():
            r.expert_bias.zero_()
            r.expert_bias[5] = 100.0
        out = r(x)
        assert (out.indices == 5).any(dim=1).all()
        logits = x @ r.weight.detach().T
        if score == "sigmoid":
            expect = torch.sigmoid(logits).gather(1, out.indices)
        elif pre:
            expect = torch.softmax(logits, -1).gather(1, out.indices)
        else:
            expect = torch.softmax(logits.gather(1, out.indices), -1)
        torch.testing.assert_close(out.probs, expect)


def test_update_expert_bias_by_hand():
    cfg = RouterConfig(H, 4, 1, expert_bias=True, expert_bias_update_rate=0.5)
    r = make(cfg, 0, bias_scale=0.0)
    r.update_expert_bias(torch.tensor([5, 1, 3, 3]))
    assert r.expert_bias.tolist() == [-0.5, 0.5, 0.0, 0.0]
    seen = []
    r.update_expert_bias(torch.tensor([5, 1, 3, 3]), reduce=lambda t: seen.append(t) or t * 2)
    assert len(seen) == 1 and r.expert_bias.tolist() == [-1.0, 1.0, 0.0, 0.0]
    # Default: the counts of the training forwards since the last update, reduced globally.
    r = make(cfg, 0, bias_scale=0.0)
    c1, c2 = r(torch.randn(7, H)).counts, r(torch.randn(5, H)).counts
    r.eval()
    r(torch.randn(9, H))  # eval passes do not count
    c = (c1 + c2).double()
    assert torch.equal(r.local_counts, c1 + c2)
    r.update_expert_bias()
    assert torch.equal(r.expert_bias, (torch.sign(c.mean() - c) * 0.5).float())
    assert r.local_counts.sum() == 0


# ----------------------------------------------------------------------------- losses
@FAST
@given(cfg=loss_configs(), b=st.integers(1, 3), ln=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_losses_and_gradient_match_reference(cfg, b, ln, seed):
    r = make(cfg, seed)
    x = torch.randn(b * ln, H)
    out = r(x, num_sequences=b)
    (out.probs.sum() * 0).backward()  # only the attached losses send gradient
    w64 = r.weight.detach().double().requires_grad_()
    idx = ref_indices(x, r.weight.detach(), cfg, r.expert_bias)
    ref, p = ref_losses(x, w64, cfg, idx, b)
    if cfg.global_aux_loss_coeff:  # one micro-batch: the running average is this batch
        ref["global_aux_loss"] = ref_balance(p, idx, cfg, cfg.global_aux_loss_coeff)
    assert set(r.last_losses) == set(ref)
    for key, v in ref.items():
        torch.testing.assert_close(r.last_losses[key].double(), v.detach(), rtol=1e-5,
                                   atol=1e-7)
    if ref:
        sum(ref.values()).backward()
        torch.testing.assert_close(r.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    else:
        assert r.weight.grad is None or not r.weight.grad.any()


@settings(max_examples=30, deadline=None)
@given(e=st.sampled_from([4, 8, 16]), k=st.sampled_from([1, 2, 4]),
       score=st.sampled_from(["softmax", "sigmoid"]), dp=st.integers(1, 2),
       lens=st.lists(st.integers(0, 3), min_size=1, max_size=4), b=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_sharded_terms_sum_to_unsharded_loss(e, k, score, dp, lens, b, seed):
    """Split each replica's sequences over R ranks (uneven, possibly empty chunks): the
    per-rank terms and gate gradients sum to the unsharded losses and their gradient."""
    if sum(lens) == 0:
        lens[0] = 1
    cfg = RouterConfig(H, e, k, score_function=score, expert_bias=True, aux_loss_coeff=0.1,
                       seq_aux_loss_coeff=0.2, global_aux_loss_coeff=0.3, z_loss_coeff=0.05)
    router = make(cfg, seed)
    total = sum(lens)
    replicas = [torch.randn(b, total, H) for _ in range(dp)]
    shards, replica_of = [], []
    for d in range(dp):
        starts = [sum(lens[:i]) for i in range(len(lens))]
        for s, ln in zip(starts, lens, strict=True):
            shards.append(replicas[d][:, s:s + ln].reshape(b * ln, H))
            replica_of.append(d)

    sim = SimulatedRanks(replica_of)
    for replay in (False, True):
        sim.replay = replay
        terms, grad = [], torch.zeros_like(router.weight)
        for rank, x in enumerate(shards):
            m = copy.deepcopy(router)
            out = m(x, num_sequences=b, reductions=sim.reductions(rank))
            (out.probs.sum() * 0).backward()
            terms.append(m.last_losses)
            grad += m.weight.grad

    w64 = router.weight.detach().double().requires_grad_()
    ref_total, all_x, all_idx = 0.0, [], []
    for d, xr in enumerate(replicas):
        x = xr.reshape(b * total, H)
        idx = ref_indices(x, router.weight.detach(), cfg, router.expert_bias)
        ref, _ = ref_losses(x, w64, cfg, idx, b)
        for key, v in ref.items():
            got = sum(t[key] for t, dd in zip(terms, replica_of, strict=True) if dd == d)
            torch.testing.assert_close(got.double(), v.detach(), rtol=1e-5, atol=1e-7)
            ref_total = ref_total + v
        all_x.append(x)
        all_idx += idx
    _, p = ref_losses(torch.cat(all_x), w64, cfg, all_idx, 1)
    ref_global = ref_balance(p, all_idx, cfg, cfg.global_aux_loss_coeff)
    got = sum(t["global_aux_loss"] for t in terms)
    torch.testing.assert_close(got.double(), ref_global.detach(), rtol=1e-5, atol=1e-7)
    (ref_total + ref_global).backward()
    torch.testing.assert_close(grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_global_aux_loss_averages_counts_over_microbatches():
    cfg = RouterConfig(H, 8, 2, global_aux_loss_coeff=0.5)
    r = make(cfg, 3)
    xs = [torch.randn(n, H) for n in (5, 9, 3)]
    w = r.weight.detach()
    seen = torch.zeros(8)
    values = []
    for m, x in enumerate(xs, start=1):
        out = r(x)
        seen += torch.bincount(out.indices.flatten(), minlength=8)
        avg = seen / m  # running mean of the counts, this micro-batch included
        p = torch.softmax(x @ w.T, -1).sum(0)
        n = x.shape[0]
        expect = 0.5 * 8 / (2 * n * n) * sum(p[e] * avg[e] for e in range(8))
        torch.testing.assert_close(r.last_losses["global_aux_loss"], expect)
        values.append(r.last_losses["global_aux_loss"])
    r.reset_global_counts()
    r(xs[0])
    torch.testing.assert_close(r.last_losses["global_aux_loss"], values[0])


def test_losses_leave_forward_output_unchanged_and_add_gradients():
    base = RouterConfig(H, 8, 2, score_function="sigmoid", normalize_topk=True)
    lossy = RouterConfig(H, 8, 2, score_function="sigmoid", normalize_topk=True,
                         aux_loss_coeff=0.1, z_loss_coeff=0.1, global_aux_loss_coeff=0.1)
    x, g = torch.randn(10, H), torch.randn(10, 2)
    grads = {}
    for name, cfg, main in (("main", base, 1.0), ("aux", lossy, 0.0), ("both", lossy, 1.0)):
        r = make(cfg, 4)
        out = r(x)
        (out.probs * g * main).sum().backward()
        grads[name] = (out, r.weight.grad)
    assert torch.equal(grads["main"][0].probs, grads["both"][0].probs)
    assert torch.equal(grads["main"][0].indices, grads["both"][0].indices)
    torch.testing.assert_close(grads["both"][1], grads["main"][1] + grads["aux"][1])


def test_loss_scale_scales_loss_gradient():
    cfg = RouterConfig(H, 8, 2, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    x = torch.randn(12, H)
    grads = []
    for scale in (1.0, 0.25):
        r = make(cfg, 5)
        r.loss_scale = scale
        (r(x).probs.sum() * 0).backward()
        grads.append(r.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], 0.25 * grads[0])


def test_no_losses_in_eval_or_no_grad():
    r = make(RouterConfig(H, 8, 2, aux_loss_coeff=0.1), 0)
    with torch.no_grad():
        r(torch.randn(4, H))
    assert r.last_losses == {}
    r.eval()
    r(torch.randn(4, H))
    assert r.last_losses == {}


# ----------------------------------------------------------------------------- construction
def test_meta_init_then_reset_parameters():
    cfg = RouterConfig(64, 16, 2, expert_bias=True, global_aux_loss_coeff=0.1, init_std=0.5)
    r = Router(cfg, device="meta")
    assert r.weight.is_meta
    r.to_empty(device="cpu")
    r.reset_parameters()
    assert 0.4 < r.weight.std().item() < 0.6
    assert all(not b.any() for b in r.buffers())
    assert set(r.state_dict()) == {"weight", "expert_bias"}


def test_fp64_router_dtype_outputs_fp32():
    x = torch.randn(8, H)
    outs = [make(RouterConfig(H, 8, 2, router_dtype=dt), 6)(x) for dt in ("fp32", "fp64")]
    assert outs[1].probs.dtype == outs[1].scores.dtype == torch.float32
    assert torch.equal(outs[0].indices, outs[1].indices)
    torch.testing.assert_close(outs[0].probs, outs[1].probs)


def test_router_dtype_holds_under_autocast():
    """bf16 autocast (the trainer's replication on GPU; CPU has the same) leaves the router's
    logits in its own dtype: the same scores as without autocast, not bf16-rounded ones."""
    x = torch.randn(64, H)
    router = make(RouterConfig(H, 8, 2), 6)
    want = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=0)
    assert torch.equal(got.indices, want.indices)


@pytest.mark.parametrize("kwargs, match", [
    ({"topk": 9}, r"topk=9 > num_experts=8: lower topk"),
    ({"num_groups": 3, "topk_groups": 1}, r"num_groups=3 must divide num_experts=8"),
    ({"num_groups": 2, "topk_groups": 3}, r"topk_groups=3 must be in 1..num_groups=2"),
    ({"num_groups": 2}, r"set both for group-limited routing"),
    ({"num_groups": 4, "topk_groups": 1, "topk": 4}, r"kept groups hold too few experts"),
    ({"num_groups": 4, "topk_groups": 3, "group_score": "topk_share"}, r"topk=2 >= topk_gr"),
    ({"score_function": "relu"}, r"score_function='relu' is unknown; use one of"),
    ({"router_dtype": "bf16"}, r"router_dtype='bf16' is unknown"),
    ({"group_score": "mean"}, r"group_score='mean' is unknown"),
    ({"aux_loss_coeff": -1.0}, r"aux_loss_coeff must be >= 0"),
    ({"topk": 0}, r"topk must be a positive int"),
])
def test_bad_config_errors_name_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**{"hidden_size": H, "num_experts": 8, "topk": 2, **kwargs})


def test_bad_forward_arguments():
    r = make(RouterConfig(H, 8, 2, seq_aux_loss_coeff=0.1), 0)
    with pytest.raises(ValueError, match=r"needs forward\(x, num_sequences=B\)"):
        r(torch.randn(4, H))
    with pytest.raises(ValueError, match=r"N=5 tokens, not divisible by num_sequences=2"):
        r(torch.randn(5, H), num_sequences=2)
    with pytest.raises(ValueError, match=r"must be \[N, hidden_size=6\]"):
        r(torch.randn(2, 3, H))
    with pytest.raises(ValueError, match=r"needs RouterConfig.expert_bias=True"):
        r.update_expert_bias(torch.ones(8))
