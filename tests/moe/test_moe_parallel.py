"""The folded MoE layer equals a single-process reference MoE, values and gradients.

The reference is written here independently: routing by hand, a plain loop over tokens and
experts, and the per-rank capacity rule applied to each rank's own (rank-major) tokens.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.debug import CommDebugMode

from foldmesh import Fold, FoldError
from foldmesh.moe import MoE, MoEConfig, RouterConfig, apply_moe_parallel
from foldmesh.testing import RankPool, assert_close_to_reference, folded_mesh, folds

WORLD = 8
H, FFN, SHARED = 6, 8, 8  # FFN sizes divisible by every etp / tp of 8 ranks
ATTN = (Shard(0), Shard(1), Shard(1))
ROUTERS = {
    "mixtral": dict(score_function="softmax", pre_softmax=False),
    "softmax_pre": dict(score_function="softmax", pre_softmax=True),
    "sigmoid_norm": dict(score_function="sigmoid", normalize_topk=True, scaling_factor=2.0),
}
# float64 model (the router's weights are rounded to fp32 once, as in training), so that
# saturated routing scores do not turn fp32 rounding into test noise
DTYPE = torch.float64
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pool():
    with RankPool(WORLD, timeout=120) as p:
        yield p


# ----------------------------------------------------------------------------- reference
def ref_route(x, w, k, score_function, pre_softmax=False, normalize_topk=False,
              scaling_factor=1.0):
    logits = x.double() @ w.double().T
    if score_function == "softmax" and not pre_softmax:
        top, idx = logits.topk(k, dim=-1)
        probs = top.softmax(-1)
    else:
        scores = logits.softmax(-1) if score_function == "softmax" else logits.sigmoid()
        probs, idx = scores.topk(k, dim=-1)
        if normalize_topk:
            probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
    return probs * scaling_factor, idx


def ref_keep(idx, probs, E, capacity, policy):
    """Per-rank capacity rule on one rank's copies: which (t, j) survive."""
    keep = torch.ones_like(idx, dtype=torch.bool)
    if capacity is None:
        return keep
    for e in range(E):
        copies = [(t, j) for t in range(idx.shape[0]) for j in range(idx.shape[1])
                  if idx[t, j] == e]
        if policy == "probs":
            copies.sort(key=lambda c: (-float(probs[c]), c[0]))
        for c in copies[capacity:]:
            keep[c] = False
    return keep


def ref_expert(x, wg, wu, wd):
    return (F.silu(x @ wg) * (x @ wu)) @ wd


def ref_moe(blocks, params, k, E, router, cf, policy, shared_gate):
    """blocks: each rank's [n, H] tokens (rank-major); returns each rank's [n, H] output."""
    outs = []
    for x in blocks:
        probs, idx = ref_route(x, params["router"], k, **router)
        # routing weights are fp32 by contract, whatever the router's compute dtype
        probs = probs.float().to(x.dtype)
        cap = None if cf is None else math.ceil(x.shape[0] * k / E * cf)
        # saturated fp32 weights tie exactly; ties go to the lower token index
        keep = ref_keep(idx, probs, E, cap, policy)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(k):
                if keep[t, j]:
                    e = int(idx[t, j])
                    y = ref_expert(x[t], params["w_gate"][e], params["w_up"][e],
                                   params["w_down"][e])
                    out[t] = out[t] + probs[t, j].to(x.dtype) * y
        if "shared" in params:
            g, u, d, gate = params["shared"]
            s = (F.silu(x @ g.T) * (x @ u.T)) @ d.T
            if shared_gate:
                s = torch.sigmoid(x @ gate.T) * s
            out = out + s
        outs.append(out)
    return outs


# ----------------------------------------------------------------------------- the check
def build(E, k, router, cf, policy, pad, shared, shared_gate, seed):
    torch.manual_seed(seed)
    rc = RouterConfig(hidden_size=H, num_experts=E, topk=k, init_std=0.5, router_dtype="fp64",
                      **ROUTERS[router])
    mc = MoEConfig(ffn_size=FFN, capacity_factor=cf, drop_policy=policy, pad_to_capacity=pad,
                   shared_ffn_size=SHARED if shared else 0, shared_gate=shared_gate,
                   init_std=0.5)
    return MoE(rc, mc, dtype=DTYPE)


def reference_params(moe):
    p = {"router": moe.router.weight.detach().clone()}
    for name in ("w_gate", "w_up", "w_down"):
        p[name] = getattr(moe.experts, name).detach().clone()
    if moe.shared_expert is not None:
        s = moe.shared_expert
        gate = s.gate.weight.detach().clone() if s.gate is not None else None
        m = s.mlp
        p["shared"] = [m.gate_proj.weight.detach().clone(), m.up_proj.weight.detach().clone(),
                       m.down_proj.weight.detach().clone(), gate]
    for v in list(p.values()):
        for t in (v if isinstance(v, list) else [v]):
            if t is not None:
                t.requires_grad_()
    return p


def rank_blocks(full, fold):
    """Each stage rank's local [b*s, H] tokens, rank-major (tp fastest, then cp, then dp)."""
    b, s = full.shape[0] // fold.dp, full.shape[1] // (fold.cp * fold.tp)
    out = []
    for d in range(fold.dp):
        for c in range(fold.cp):
            for t in range(fold.tp):
                q = c * fold.tp + t
                out.append(full[d * b:(d + 1) * b, q * s:(q + 1) * s].reshape(-1, full.shape[2]))
    return out


def check_moe(fold, E, k, router, cf, policy, pad, shared, shared_gate, b, s, skew, seed,
              dispatcher):
    fm = folded_mesh(fold)
    moe = build(E, k, router, cf, policy, pad, shared, shared_gate, seed)
    params = reference_params(moe)
    apply_moe_parallel(moe, fm, dispatcher=dispatcher)
    B, S = b * fold.dp, s * fold.cp * fold.tp
    torch.manual_seed(seed + 1)
    full = torch.randn(B, S, H, dtype=DTYPE)
    if skew:  # every token's first choice is expert 0: empty experts, ranks receiving nothing
        full = full + 10.0 * params["router"][0].detach()
    grad = torch.randn(B, S, H, dtype=DTYPE)
    # reference on the unsharded batch
    xr = full.clone().requires_grad_()
    outs = ref_moe(rank_blocks(xr, fold), params, k, E, ROUTERS[router], cf, policy,
                   shared_gate)
    ref_out = torch.cat(outs)
    loss = (ref_out * torch.cat(rank_blocks(grad, fold))).sum()
    if loss.requires_grad:  # an empty batch leaves nothing to differentiate
        loss.backward()

    f = fold
    sl = slice_of(fm, f, b, s)
    x = DTensor.from_local(full[sl].clone(), fm.attn_stage, ATTN, run_check=False,
                           shape=full.shape, stride=full.stride()).requires_grad_()
    y = moe(x)
    assert y.placements == ATTN and y.shape == x.shape
    loss = (y.to_local() * grad[sl]).sum()
    if B * S:
        loss.backward()

    assert_close_to_reference(y, ref_out_attn(outs, f, b, s, B, S), name="MoE output",
                              rtol=1e-4, atol=1e-5)
    if B * S == 0:
        return
    assert_close_to_reference(x.grad, xr.grad, name="input grad", **GRAD_TOL)
    for name in ("w_gate", "w_up", "w_down"):
        g = getattr(moe.experts, name).grad.full_tensor()
        dist.all_reduce(g, group=fm["edp"].get_group())  # each edp replica saw other tokens
        assert_close_to_reference(g, grad_of(params[name]), name=f"{name} grad", **GRAD_TOL)
    local = [moe.router.weight]
    refs = [params["router"]]
    if shared:
        sh = moe.shared_expert
        local += [sh.mlp.gate_proj.weight, sh.mlp.up_proj.weight, sh.mlp.down_proj.weight]
        refs += params["shared"][:3]
        if shared_gate:
            local.append(sh.gate.weight)
            refs.append(params["shared"][3])
    for p, r in zip(local, refs, strict=True):
        # every non-expert gradient is complete for the tp group: sum over the replicas
        g = grad_of(p)
        g = g.full_tensor() if isinstance(g, DTensor) else g.clone()
        dist.all_reduce(g, group=fm["dp_cp"].get_group())
        assert_close_to_reference(g, grad_of(r), name="replicated weight grad", **GRAD_TOL)


def grad_of(p):
    """A parameter's gradient; zeros when no token reached it (autograd leaves None)."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


def slice_of(fm, f, b, s):
    d, c, t = fm.coordinate("dp"), fm.coordinate("cp"), fm.coordinate("tp")
    q = c * f.tp + t
    return (slice(d * b, (d + 1) * b), slice(q * s, (q + 1) * s))


def ref_out_attn(outs, f, b, s, B, S):
    full = torch.zeros(B, S, H, dtype=DTYPE)
    i = 0
    for d in range(f.dp):
        for c in range(f.cp):
            for t in range(f.tp):
                q = c * f.tp + t
                full[d * b:(d + 1) * b, q * s:(q + 1) * s] = outs[i].detach().view(b, s, H)
                i += 1
    return full


moe_cases = st.fixed_dictionaries({
    "k": st.sampled_from([1, 2, 4]),
    "router": st.sampled_from(sorted(ROUTERS)),
    "shared": st.booleans(),
    "shared_gate": st.booleans(),
    "b": st.integers(0, 2),
    "s": st.integers(1, 2),
    "skew": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def experts_for(fold):
    """Numbers of experts the fold's ep divides (ep may span tp, cp and dp ranks)."""
    return st.sampled_from([e for e in (4, 8, 16) if e % fold.ep == 0])


@SETTINGS
@given(fold=folds(WORLD), case=moe_cases, data=st.data(),
       dispatcher=st.sampled_from(["alltoall", "allgather"]))
def test_dropless_matches_reference(pool, fold, case, data, dispatcher):
    E = data.draw(experts_for(fold), label="E")
    pool.run(check_moe, fold, E=E, cf=None, policy="probs", pad=False, dispatcher=dispatcher,
             **case)


@SETTINGS
@given(fold=folds(WORLD), case=moe_cases, data=st.data(),
       cf=st.sampled_from([0.5, 1.0, 1.5]), policy=st.sampled_from(["probs", "position"]),
       pad=st.booleans(), dispatcher=st.sampled_from(["alltoall", "allgather"]))
def test_token_dropping_matches_reference(pool, fold, case, data, cf, policy, pad, dispatcher):
    E = data.draw(experts_for(fold), label="E")
    pool.run(check_moe, fold, E=E, cf=cf, policy=policy, pad=pad, dispatcher=dispatcher,
             **case)


def check_errors():
    fm = folded_mesh(Fold(tp=2, cp=2, dp=2, ep=4, etp=2, edp=1))
    with pytest.raises(FoldError, match=r"num_experts = 6 is not divisible by ep = 4"):
        apply_moe_parallel(build(6, 2, "mixtral", None, "probs", False, False, False, 0), fm)
    moe = MoE(RouterConfig(hidden_size=H, num_experts=8, topk=2), MoEConfig(ffn_size=3))
    with pytest.raises(FoldError, match=r"expert FFN size = 3 is not divisible by etp = 2"):
        apply_moe_parallel(moe, fm)
    moe = MoE(RouterConfig(hidden_size=H, num_experts=8, topk=2),
              MoEConfig(ffn_size=4, shared_ffn_size=5))
    with pytest.raises(FoldError, match=r"shared expert FFN size = 5 is not divisible by tp = 2"):
        apply_moe_parallel(moe, fm)
    moe = apply_moe_parallel(build(8, 2, "mixtral", None, "probs", False, False, False, 0), fm)
    full = torch.randn(2, 4, H, dtype=DTYPE)
    x = DTensor.from_local(full[:1, :1], fm.attn_stage, ATTN, run_check=False,
                           shape=full.shape, stride=full.stride())
    from torch.distributed.tensor import Replicate
    xr = x.redistribute(fm.attn_stage, (Shard(0), Shard(1), Replicate()))
    with pytest.raises(FoldError, match="sequence parallelism"):
        moe(xr)


def test_errors(pool):
    pool.run(check_errors)


def check_comms(fold, dispatcher, pad):
    fm = folded_mesh(fold)
    moe = apply_moe_parallel(build(8, 2, "mixtral", 1.0 if pad else None, "probs", pad,
                                   False, False, 0), fm, dispatcher=dispatcher)
    f = fold
    full = torch.randn(f.dp, 2 * f.cp * f.tp, H, dtype=DTYPE)
    sl = slice_of(fm, f, 1, 2)
    x = DTensor.from_local(full[sl].clone(), fm.attn_stage, ATTN, run_check=False,
                           shape=full.shape, stride=full.stride()).requires_grad_()
    with CommDebugMode() as fwd:
        y = moe(x)
    with CommDebugMode() as bwd:
        y.to_local().sum().backward()
    name = {str(k).split(".")[-1]: v for k, v in fwd.get_comm_counts().items()}
    back = {str(k).split(".")[-1]: v for k, v in bwd.get_comm_counts().items()}
    return name, back


EXPECTED = {
    # (dispatcher, etp > 1, pad): (forward, backward) collective counts, see docs/placements.md;
    # the backward all-reduce sums the router gate's gradient over tp (= 2 here)
    ("alltoall", False, False): ({"all_gather_into_tensor": 1, "all_to_all_single": 2},
                                 {"all_to_all_single": 2, "all_reduce": 1}),
    ("alltoall", True, False): ({"all_gather_into_tensor": 1, "all_to_all_single": 4},
                                {"all_to_all_single": 4, "all_reduce": 1}),
    ("alltoall", True, True): ({"all_to_all_single": 4},
                               {"all_to_all_single": 4, "all_reduce": 1}),
    ("allgather", False, False): ({"all_gather_into_tensor": 3, "reduce_scatter_tensor": 1},
                                  {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 2,
                                   "all_reduce": 1}),
    ("allgather", True, False): ({"all_gather_into_tensor": 3, "reduce_scatter_tensor": 1},
                                 {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 2,
                                   "all_reduce": 1}),
}


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=str)
def test_collectives_match_placements_doc(pool, key):
    dispatcher, etp_gt1, pad = key
    fold = (Fold(tp=2, cp=2, dp=2, ep=4, etp=2, edp=1) if etp_gt1
            else Fold(tp=2, cp=2, dp=2, ep=8, etp=1, edp=1))
    fwd, bwd = pool.run(check_comms, fold, dispatcher, pad)[0]
    assert (fwd, bwd) == EXPECTED[key]


# ----------------------------------------------------------------------------- losses
LOSSES = dict(aux_loss_coeff=0.1, seq_aux_loss_coeff=0.05, global_aux_loss_coeff=0.2,
              z_loss_coeff=0.01)


def ref_balance(x, w, k, router, E):
    """(P_e, c_e, T) of one token set, from the definitions: P sums the unbiased pre-top-k
    scores (softmax over E, or sigmoid normalised per token), c counts top-k selections."""
    logits = x.double() @ w.double().T
    scores = logits.softmax(-1) if router["score_function"] == "softmax" else (
        logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True))
    _, idx = ref_route(x, w, k, **router)
    c = torch.zeros(E, dtype=torch.float64)
    for e in idx.flatten().tolist():
        c[e] += 1
    return scores.sum(0), c, x.shape[0], logits


def ref_losses(full, w, fold, k, router, E, b):
    """The four losses of the unsharded batch: aux and z per data-parallel replica (summed over
    replicas), seq-aux per sequence (averaged within a replica, summed over replicas), global
    aux over the whole batch."""
    out = dict(aux_loss=0.0, seq_aux_loss=0.0, global_aux_loss=0.0, z_loss=0.0)
    co = {name: LOSSES[name + "_coeff"] for name in out}
    for d in range(fold.dp):
        rep = full[d * b:(d + 1) * b]
        P, c, T, logits = ref_balance(rep.reshape(-1, H), w, k, router, E)
        out["aux_loss"] = out["aux_loss"] + co["aux_loss"] * E / (k * T * T) * (P * c).sum()
        lse = torch.logsumexp(logits, -1)
        out["z_loss"] = out["z_loss"] + co["z_loss"] * (lse * lse).mean()
        seq = 0.0
        for i in range(b):
            P, c, T, _ = ref_balance(rep[i], w, k, router, E)
            seq = seq + co["seq_aux_loss"] * E / (k * T * T) * (P * c).sum()
        out["seq_aux_loss"] = out["seq_aux_loss"] + seq / b
    P, c, T, _ = ref_balance(full.reshape(-1, H), w, k, router, E)
    out["global_aux_loss"] = co["global_aux_loss"] * E / (k * T * T) * (P * c).sum()
    return out, c


def check_losses(fold, E, k, router, b, s, seed, dispatcher):
    fm = folded_mesh(fold)
    torch.manual_seed(seed)
    rc = RouterConfig(hidden_size=H, num_experts=E, topk=k, init_std=0.5, expert_bias=True,
                      router_dtype="fp64", **LOSSES, **ROUTERS[router])
    moe = MoE(rc, MoEConfig(ffn_size=FFN, init_std=0.5), dtype=DTYPE)
    params = reference_params(moe)
    apply_moe_parallel(moe, fm, dispatcher=dispatcher)
    B, S = b * fold.dp, s * fold.cp * fold.tp
    torch.manual_seed(seed + 1)
    full, grad = torch.randn(B, S, H, dtype=DTYPE), torch.randn(B, S, H, dtype=DTYPE)

    outs = ref_moe(rank_blocks(full, fold), params, k, E, ROUTERS[router], None, "probs", False)
    main = (torch.cat(outs) * torch.cat(rank_blocks(grad, fold))).sum()
    losses, global_counts = ref_losses(full, params["router"], fold, k, ROUTERS[router], E, b)
    (main + sum(losses.values())).backward()

    sl = slice_of(fm, fold, b, s)
    x = DTensor.from_local(full[sl].clone(), fm.attn_stage, ATTN, run_check=False,
                           shape=full.shape, stride=full.stride()).requires_grad_()
    (moe(x).to_local() * grad[sl]).sum().backward()
    stage = fm["dp_cp_tp"].get_group()
    for name, want in losses.items():
        got = moe.router.last_losses[name].clone().double()
        dist.all_reduce(got, group=stage)  # per-rank terms add up to the unsharded losses
        assert_close_to_reference(got, want.detach(), name=name, rtol=1e-5, atol=1e-7)
    g = moe.router.weight.grad.clone()
    dist.all_reduce(g, group=fm["dp_cp"].get_group())
    assert_close_to_reference(g, params["router"].grad, name="router grad with losses",
                              **GRAD_TOL)
    # aux-loss-free bias: one update from the stage's counts, the same on every rank
    moe.router.update_expert_bias()
    rate = rc.expert_bias_update_rate
    want = rate * torch.sign(global_counts.mean() - global_counts)
    assert_close_to_reference(moe.router.expert_bias, want.float(), name="expert bias")


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fold=folds(WORLD, max_ep=4), E=st.sampled_from([4, 8]),
       k=st.sampled_from([1, 2]), router=st.sampled_from(sorted(ROUTERS)),
       b=st.integers(1, 2), s=st.integers(1, 2), seed=st.integers(0, 2**16),
       dispatcher=st.sampled_from(["alltoall", "allgather"]))
def test_losses_and_bias_match_unsharded_definitions(pool, fold, E, k, router, b, s, seed,
                                                      dispatcher):
    pool.run(check_losses, fold, E, k, router, b, s, seed, dispatcher)
