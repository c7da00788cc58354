"""The collective counter: exact kinds, fold axes, bytes and directions on 4 gloo ranks.

Every expected byte count is written here from shapes and the routing, never read back from
the counter: plain c10d and functional collectives on every named sub-mesh, the fold
transition (docs/placements.md: one all-gather over etp forward, one reduce-scatter
backward), the folded MoE layer's all-to-alls from the router's choices, FSDP2's
all-gather and reduce-scatter, and a pipeline's send/recv over pp. What the counter cannot
see (another thread) is pinned down too.
"""

import threading
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Shard
from torch.utils.checkpoint import checkpoint

from foldmesh import Fold, parallelize, to_moe
from foldmesh._mesh import FLATTENED
from foldmesh.models import Transformer, preset
from foldmesh.moe import MoE, MoEConfig, RouterConfig, apply_moe_parallel
from foldmesh.pipeline import apply_pipeline, split_model
from foldmesh.testing import CollectiveCounter, RankPool, folded_mesh, folds
from foldmesh.testing._comm import AXES, AXIS_NAMES

WORLD = 4
F64 = 8  # bytes of a float64 / int64 element
ATTN = (Shard(0), Shard(1), Shard(1))
LIST_ALL_TO_ALL = torch.__version__ >= "2.13"  # gloo's list all_to_all: not in torch 2.11
SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pool():
    with RankPool(WORLD, timeout=60) as p:
        yield p


# ----------------------------------------------------------------------------- axis labels
def expected_label(fold: Fold, name: str) -> str:
    """The label of ``name``'s group, from the fold's sizes alone: the documented rule.

    A flattened name with at most one axis of size > 1 is that axis' mesh; every mesh dim
    spanning the whole world is torch's default group; of the names sharing a group the
    most specific win (a single axis, then a flattened name, then world), ties joined by "=".
    """
    if name in FLATTENED:
        axes = FLATTENED[name][1]
        big = [a for a in axes if fold.size(a) > 1]
        if len(big) <= 1:
            return expected_label(fold, big[0] if big else axes[0])
    if name != "world" and _ranks(fold, name) < WORLD:
        return name
    singles = [a for a in AXES if fold.size(a) == WORLD]
    flat = [n for n in FLATTENED if _ranks(fold, n) == WORLD
            and sum(fold.size(a) > 1 for a in FLATTENED[n][1]) > 1]
    return "=".join(singles or flat or ["world"])


def _ranks(fold: Fold, name: str) -> int:
    out = 1
    for a in FLATTENED[name][1] if name in FLATTENED else (name,):
        out *= fold.size(a)
    return out


def group_of(fm, name):
    return (fm.world if name == "world" else fm[name]).get_group()


def check_plain_collectives(fold: Fold) -> None:
    """c10d and functional collectives on every named group: kind, axis, size, bytes."""
    fm = folded_mesh(fold)
    counter = CollectiveCounter(fm)
    for name in AXIS_NAMES:
        assert counter.axis_of(name) == expected_label(fold, name), name
    for name in AXIS_NAMES:
        pg = group_of(fm, name)
        g, me = pg.size(), pg.rank()
        if g == 1:
            continue  # a size-1 axis never communicates
        label = expected_label(fold, name)
        # uneven all-to-all: group rank i sends i + j + 1 rows of 2 int64 to group rank j
        send = [me + j + 1 for j in range(g)]
        recv = [j + me + 1 for j in range(g)]
        a2a = (sum(send) - send[me]) * 2 * F64
        counter.reset()
        with counter:
            dist.all_reduce(torch.ones(3), group=pg)
            dist.all_gather_into_tensor(torch.empty(2 * g, 3, dtype=torch.float64),
                                        torch.ones(2, 3, dtype=torch.float64), group=pg)
            dist.reduce_scatter_tensor(torch.empty(2, 3), torch.ones(2 * g, 3), group=pg)
            dist.all_to_all_single(torch.empty(sum(recv), 2, dtype=torch.int64),
                                   torch.ones(sum(send), 2, dtype=torch.int64), recv, send,
                                   group=pg)
            fc.all_reduce(torch.ones(5), "sum", pg).wait()
            fc.all_gather_tensor(torch.ones(2, 3, dtype=torch.float64), 0, pg).wait()
            fc.reduce_scatter_tensor(torch.ones(2 * g, 3), "sum", 0, pg).wait()
            fc.all_to_all_single(torch.ones(sum(send), 2, dtype=torch.int64), recv, send,
                                 pg).wait()
        got = [(r.kind, r.axis, r.group_size, r.bytes, r.direction) for r in counter.records]
        want = [(k, label, g, b, "forward") for k, b in [
            ("all_reduce", 12), ("all_gather", 48), ("reduce_scatter", g * 24),
            ("all_to_all", a2a),
            ("all_reduce", 20), ("all_gather", 48), ("reduce_scatter", g * 24),
            ("all_to_all", a2a)]]
        assert got == want, f"{name}: {got}"
        assert [r.op for r in counter.records] == [
            "c10d::allreduce_", "c10d::_allgather_base_", "c10d::_reduce_scatter_base_",
            "c10d::alltoall_base_", "_c10d_functional::all_reduce",
            "_c10d_functional::all_gather_into_tensor",
            "_c10d_functional::reduce_scatter_tensor", "_c10d_functional::all_to_all_single"]
        assert all(name in r.aliases for r in counter.records), counter.records
        assert counter.bytes_by()[("all_to_all", label, "forward")] == 2 * a2a
        assert counter.counts_by()[("all_reduce", label, "forward")] == 2


@SETTINGS
@given(fold=folds(WORLD))
@example(fold=Fold(tp=2, cp=2, ep=2, etp=2).resolve(WORLD))   # cp_tp = ep_etp = world
@example(fold=Fold(tp=4, ep=4).resolve(WORLD))                # tp = ep = world
@example(fold=Fold(pp=2, tp=2, ep=2).resolve(WORLD))          # pp: a real axis
def test_plain_collectives_on_every_named_group(pool, fold):
    pool.run(check_plain_collectives, fold)


def check_shared_group_labels() -> None:
    """The labels of names that share a process group, spelled out for three folds."""
    cases = {
        # tp and ep both span the world: one group, no rule can tell them apart
        Fold(tp=4, ep=4): dict(tp="tp=ep", ep="tp=ep", cp_tp="tp=ep", ep_etp="tp=ep",
                               dp_cp_tp="tp=ep", world="tp=ep", dp_cp="dp", etp="etp"),
        # the flattened dp x tp is the world; cp_tp and ep_etp are tp's and ep's own meshes
        Fold(tp=2, ep=2): dict(dp_cp_tp="dp_cp_tp", world="dp_cp_tp", cp_tp="tp",
                               ep_etp="ep", dp_cp="dp", tp="tp"),
        # with two stages nothing but the world spans every rank
        Fold(pp=2, tp=2, ep=2): dict(world="world", dp_cp_tp="tp", ep_etp="ep", pp="pp"),
    }
    for fold, labels in cases.items():
        counter = CollectiveCounter(folded_mesh(fold.resolve(WORLD)))
        got = {name: counter.axis_of(name) for name in labels}
        assert got == labels, f"{fold}: {got}"


def test_shared_group_labels(pool):
    pool.run(check_shared_group_labels)


def check_other_groups_and_threads() -> None:
    """A group outside the fold, the default group, broadcast, batched P2P, no fold at
    all, and a collective on another thread (not recorded: dispatch modes are per thread)."""
    fm = folded_mesh(Fold(pp=2, dp=2).resolve(WORLD))  # only "world" spans every rank
    default = dist.distributed_c10d._get_default_group()
    me = dist.get_rank()
    # a group the fold does not hold: the pairs {0, 1} and {2, 3}, made on every rank
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair = pairs[me // 2]
    counter, bare = CollectiveCounter(fm), CollectiveCounter()
    with counter, bare:
        dist.all_reduce(torch.ones(2))
        dist.all_reduce(torch.ones(2), group=pair)
        dist.broadcast(torch.ones(4, dtype=torch.float64), src=0)
        peer = me ^ 1
        ops = [dist.P2POp(dist.isend, torch.ones(3), peer),
               dist.P2POp(dist.irecv, torch.empty(3), peer)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        # dispatch modes are thread-local: this one is not recorded
        worker = threading.Thread(target=dist.all_reduce, args=(torch.ones(7),))
        worker.start()
        worker.join()
    assert [(r.kind, r.axis, r.bytes) for r in counter.records] == [
        ("all_reduce", "world", 8), ("all_reduce", "unknown", 8), ("broadcast", "world", 32),
        ("send", "world", 12), ("recv", "world", 12)]
    # the inner counter sees the same ops (modes stack); without a fold: default / unknown
    assert [r.axis for r in bare.records] == ["default", "unknown", "default", "default",
                                              "default"]
    assert counter.records[1].group_size == 2 and counter.records[0].group == default.group_name
    table = counter.table()
    assert "all_reduce" in table and "total" in table.splitlines()[-1], table
    with pytest.raises(ValueError, match=r"CollectiveCounter\(fm\)"):
        bare.axis_of("tp")


def test_other_groups_broadcast_p2p_and_threads(pool):
    pool.run(check_other_groups_and_threads)


def check_list_rooted_and_dtensor_ops() -> None:
    """The list and rooted c10d forms, a barrier, blocking P2P and DTensor's own all-to-all
    (the op DTensor issues for Shard(i) -> Shard(j) on GPUs; on CPU it all-gathers)."""
    fm = folded_mesh(Fold(pp=2, dp=2).resolve(WORLD))
    me, W = dist.get_rank(), WORLD
    pg = fm["dp"].get_group()
    counter = CollectiveCounter(fm)
    with counter:
        dist.barrier()
        dist.all_gather([torch.empty(3) for _ in range(W)], torch.ones(3))
        dist.reduce_scatter(torch.empty(2), [torch.ones(2) for _ in range(W)])
        if LIST_ALL_TO_ALL:
            dist.all_to_all([torch.empty(2) for _ in range(W)],
                            [torch.ones(2) for _ in range(W)])
        dist.reduce(torch.ones(5), dst=0)
        dist.gather(torch.ones(2), [torch.empty(2) for _ in range(W)] if me == 0 else None)
        dist.scatter(torch.empty(6), [torch.ones(6) for _ in range(W)] if me == 0 else None)
        if me % 2 == 0:
            dist.send(torch.ones(3, dtype=torch.float64), dst=me + 1)
        else:
            dist.recv(torch.empty(3, dtype=torch.float64), src=me - 1)
        # [4, 4] float32 split over dim 1 into 2 chunks: one [4, 2] chunk goes to the peer
        torch.ops._dtensor.shard_dim_alltoall(torch.ones(4, 4), 0, 1, pg.group_name)
    p2p = ("send", "world", 24) if me % 2 == 0 else ("recv", "world", 24)
    assert [(r.kind, r.axis, r.bytes) for r in counter.records] == [
        ("barrier", "world", 0), ("all_gather", "world", 12), ("reduce_scatter", "world", 32),
        *([("all_to_all", "world", (W - 1) * 8)] if LIST_ALL_TO_ALL else []),
        ("reduce", "world", 20), ("gather", "world", 8), ("scatter", "world", 24), p2p,
        ("all_to_all", "dp", 32)], counter.records


def test_list_rooted_and_dtensor_ops(pool):
    pool.run(check_list_rooted_and_dtensor_ops)


# ----------------------------------------------------------------------------- transition
def attn_input(fm, H, seed):
    """[2dp, 2cp·tp, H] float64 attention activations; each rank holds a [2, 2, H] block."""
    f = fm.fold
    B, S = 2 * f.dp, 2 * f.cp * f.tp
    torch.manual_seed(seed)
    local = torch.randn(2, 2, H, dtype=torch.float64)
    x = DTensor.from_local(local, fm.attn_stage, ATTN, run_check=False, shape=(B, S, H),
                           stride=(S * H, H, 1))
    return x.detach().requires_grad_()


def check_to_moe(fold: Fold, H: int) -> None:
    fm = folded_mesh(fold)
    f = fm.fold
    x = attn_input(fm, H, seed=0)
    shard = 2 * 2 * H * F64  # this rank's [4, H] float64 tokens
    fwd, bwd, plain = (CollectiveCounter(fm) for _ in range(3))
    with fwd:
        y = to_moe(x, fm)
    # the gradient of the experts' partial sums arrives Partial over etp (docs/placements.md)
    with bwd:
        y.to_local(grad_placements=(Shard(0), Shard(0), Partial())).sum().backward()
    y = to_moe(x, fm)
    with plain:
        # to_local() without grad_placements declares the gradient Replicate over etp:
        # its way back to Shard(0) is a local slice, no collective
        y.to_local().sum().backward()
    assert plain.records == []
    if f.etp == 1:
        assert fwd.records == [] and bwd.records == []
        return
    etp = fwd.axis_of("etp")
    assert etp == expected_label(f, "etp")  # "etp" unless etp spans every rank
    assert fwd.counts_by() == {("all_gather", etp, "forward"): 1}
    assert fwd.bytes_by() == {("all_gather", etp, "forward"): shard}
    assert bwd.counts_by() == {("reduce_scatter", etp, "backward"): 1}
    assert bwd.bytes_by() == {("reduce_scatter", etp, "backward"): f.etp * shard}
    assert fwd.records[0].group_size == bwd.records[0].group_size == f.etp
    assert "etp" in fwd.records[0].aliases


@SETTINGS
@given(fold=folds(WORLD), H=st.integers(1, 3))
@example(fold=Fold(tp=2, ep=2, etp=2).resolve(WORLD), H=2)
def test_to_moe_gathers_over_etp_and_reduce_scatters_back(pool, fold, H):
    pool.run(check_to_moe, fold, H)


# ----------------------------------------------------------------------------- MoE layer
def check_moe_alltoall(fold: Fold, seed: int) -> None:
    """The folded MoE layer, forward + backward: every collective and its bytes, from the
    router's choices on every rank of this rank's ep x etp group."""
    fm = folded_mesh(fold)
    f = fm.fold
    H, E, k = 4, 4, 2
    torch.manual_seed(seed)  # the same weights on every rank
    moe = MoE(RouterConfig(hidden_size=H, num_experts=E, topk=k, init_std=1.0),
              MoEConfig(ffn_size=4), dtype=torch.float64)
    apply_moe_parallel(moe, fm, dispatcher="alltoall")
    chosen = []
    moe.router.register_forward_hook(lambda mod, args, out: chosen.append(out.indices))
    x = attn_input(fm, H, seed + 1 + dist.get_rank())  # every rank its own tokens
    counter = CollectiveCounter(fm)
    with counter:
        moe(x).to_local().pow(2).sum().backward()

    # Every rank's expert choices and coordinates, exchanged after counting.
    (mine,) = chosen
    every = [torch.empty_like(mine) for _ in range(WORLD)]
    dist.all_gather(every, mine)
    coords = [None] * WORLD
    dist.all_gather_object(coords, tuple(fm.coordinate(a) for a in ("pp", "edp", "ep", "etp")))
    pp, edp, j0, t0 = coords[dist.get_rank()]
    El = E // f.ep

    def rows(rank, j):
        """Copies of ``rank``'s tokens routed to ep rank j's experts (dropless)."""
        return int(((every[rank] >= j * El) & (every[rank] < (j + 1) * El)).sum())

    peers = {(c[2], c[3]): r for r, c in enumerate(coords) if c[:2] == (pp, edp)}
    send = [rows(dist.get_rank(), j) for j in range(f.ep)]         # to ep rank j
    recv = [rows(peers[(j, t0)], j0) for j in range(f.ep)]          # from ep rank j
    gathered = [sum(rows(peers[(j, t)], j0) for j in range(f.ep)) for t in range(f.etp)]
    row = H * F64
    want_bytes, want_counts = {}, {}

    def want(kind, axis, direction, nbytes, count):
        want_bytes[(kind, axis, direction)] = nbytes
        want_counts[(kind, axis, direction)] = count

    if f.ep * f.etp > 1:  # the per-expert counts [E] int64
        want("all_gather", counter.axis_of("ep_etp"), "forward", E * F64, 1)
    if f.ep > 1:  # dispatch sends my rows for others' experts, combine returns theirs
        ep = counter.axis_of("ep")
        remote = (sum(send) - send[j0] + sum(recv) - recv[j0]) * row
        for direction in ("forward", "backward"):
            want("all_to_all", ep, direction, remote, 2)
    if f.etp > 1:  # AllGather-V and ReduceScatter-V over etp as all-to-alls
        etp = counter.axis_of("etp")
        m = sum(recv)
        remote = ((f.etp - 1) * m + sum(gathered) - gathered[t0]) * row
        for direction in ("forward", "backward"):
            want("all_to_all", etp, direction, remote, 2)
    if f.tp > 1:  # the router gate's gradient [E, H], summed over tp in backward
        want("all_reduce", counter.axis_of("tp"), "backward", E * H * F64, 1)
    assert counter.bytes_by() == want_bytes, counter.table()
    assert counter.counts_by() == want_counts, counter.table()
    for name in ("ep", "etp", "ep_etp", "tp"):  # the tokens go over ep, the counts ep_etp
        assert counter.axis_of(name) == expected_label(f, name), name


@pytest.mark.parametrize("fold", [f.resolve(WORLD) for f in (
    Fold(tp=2, ep=2, etp=2),        # ep and etp exchanges, router gradient over tp
    Fold(cp=2, ep=4),               # ep spans every rank: its group is the default one
    Fold(tp=2, ep=2),               # etp = 1: the counts go over ep alone
    Fold(pp=2, ep=2),               # one stage's ep group
)], ids=str)
@pytest.mark.parametrize("seed", [3, 4])
def test_moe_alltoall_bytes_follow_the_routing(pool, fold, seed):
    pool.run(check_moe_alltoall, fold, seed)


# ----------------------------------------------------------------------------- backward: FSDP2
def check_fsdp_and_autograd_collectives() -> None:
    """Collectives the autograd engine issues are recorded as backward, with exact bytes:
    FSDP2's pre-backward all-gather and reduce-scatter, a functional all-to-all's backward,
    and the all-gather that activation checkpointing recomputes."""
    fm = folded_mesh(Fold(pp=2, dp=2).resolve(WORLD))
    pg = fm["dp"].get_group()
    g = pg.size()
    torch.manual_seed(0)
    # even dim-0 shards, so no padding: inner [2g, 4] + [2g], root [4g, 2g] + [4g] float32
    model = torch.nn.Sequential(torch.nn.Linear(4, 2 * g), torch.nn.Linear(2 * g, 4 * g))
    fully_shard(model[0], mesh=fm["dp"])  # resharded after forward: gathered again
    fully_shard(model, mesh=fm["dp"])     # the root keeps its weights for the backward
    inner, root = (2 * 4 + 2) * 4, (4 * 2 * g + 4) * 4  # this rank's shards, bytes
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    counter = CollectiveCounter(fm)
    with counter:
        model(torch.ones(3, 4)).sum().backward()
        a = torch.ones(2 * g, 3, requires_grad=True)
        fc.all_to_all_single_autograd(a, [2] * g, [2] * g, pg).sum().backward()
        b = torch.ones(2, 3, requires_grad=True)
        # pow saves the gathered tensor, so the backward recomputes the all-gather
        checkpoint(lambda t: gather(t, 0, pg).pow(2), b, use_reentrant=False).sum().backward()
    a2a, ag = (g - 1) * 2 * 3 * 4, 2 * 3 * 4
    assert counter.bytes_by() == {
        ("all_gather", "dp", "forward"): inner + root + ag,
        ("all_gather", "dp", "backward"): inner + ag,
        ("reduce_scatter", "dp", "backward"): g * (inner + root) + g * ag,
        ("all_to_all", "dp", "forward"): a2a,
        ("all_to_all", "dp", "backward"): a2a,
    }, counter.table()
    assert counter.counts_by() == {
        ("all_gather", "dp", "forward"): 3, ("all_gather", "dp", "backward"): 2,
        ("reduce_scatter", "dp", "backward"): 3,
        ("all_to_all", "dp", "forward"): 1, ("all_to_all", "dp", "backward"): 1,
    }, counter.table()


def test_backward_collectives_of_fsdp_and_autograd(pool):
    pool.run(check_fsdp_and_autograd_collectives)


# ----------------------------------------------------------------------------- pipeline
def check_pipeline_p2p(schedule: str, n: int) -> None:
    """pp = 2: each micro-batch's activation goes forward and its gradient back over pp."""
    fm = folded_mesh(Fold(pp=2, dp=2).resolve(WORLD))
    cfg = preset("debug-mixtral", num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1,
                 expert_ffn_size=4, num_experts=2, vocab_size=16)
    cfg = replace(cfg, aux_loss_coeff=0.0)
    m, S = 1, 4
    with torch.device("meta"):
        model = Transformer(cfg, dtype=torch.float64)
    parts = split_model(model, fm, schedule=schedule)
    for part in parts:
        parallelize(part, fm)
        part.to_empty(device="cpu")
        part.init_weights(seed=0)
    pipe = apply_pipeline(parts, fm, schedule=schedule, microbatches=n, microbatch_size=m,
                          seq_len=S, dtype=torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (n * m, S), generator=torch.Generator().manual_seed(0))
    pipe.step(ids, ids)  # the first step runs torch's P2P warm-up: count the second
    counter = CollectiveCounter(fm)
    with counter:
        pipe.step(ids, ids)
    act = m * S * cfg.hidden_size * F64  # one micro-batch's [m, S, H] float64 block
    # Sends and receives of gradients are "forward": the schedule issues them between
    # backward calls, not inside one (direction is the autograd engine's state).
    assert counter.bytes_by() == {
        ("send", "pp", "forward"): n * act,
        ("recv", "pp", "forward"): n * act,
        ("all_reduce", "pp", "forward"): 4,  # the last stage's fp32 loss, to every stage
    }, counter.table()
    assert counter.counts_by() == {("send", "pp", "forward"): n, ("recv", "pp", "forward"): n,
                                   ("all_reduce", "pp", "forward"): 1}, counter.table()


@pytest.mark.parametrize("schedule,n", [("1F1B", 2), ("GPipe", 3)])
def test_pipeline_p2p_over_pp(pool, schedule, n):
    pool.run(check_pipeline_p2p, schedule, n)
