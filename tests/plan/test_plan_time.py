"""The time model's pieces that can be checked without a GPU: which groups cross nodes, the
alpha-beta terms, the bubble of each schedule."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foldmesh import Fold
from foldmesh._mesh import FLATTENED
from foldmesh.plan import Collective, rank_coordinates
from foldmesh.plan._hardware import HARDWARE
from foldmesh.plan._time import bubble_slots, collective_time, span
from foldmesh.plan._workload import Layout
from foldmesh.testing import all_folds

FOLDS = [f for w in (16, 32, 64) for f in all_folds(w, pp=(1, 2, 4))]


def group_of(fold: Fold, name: str, rank: int) -> list[int]:
    """The ranks sharing ``rank``'s group of ``name``, from the coordinates alone: those
    equal on every axis of its view outside the group's axes (and on pp)."""
    if name == "world":
        return list(range(fold.world_size))
    view, axes = FLATTENED.get(name, (None, (name,)))
    others = [a for a in (("tp", "cp", "dp") if axes[0] in ("tp", "cp", "dp")
                          else ("etp", "ep", "edp")) if a not in axes]
    if axes == ("pp",):
        others = ["tp", "cp", "dp"]
    mine = rank_coordinates(fold, rank)
    keep = others + ([] if axes == ("pp",) else ["pp"])
    return [r for r in range(fold.world_size)
            if all(rank_coordinates(fold, r)[a] == mine[a] for a in keep)]


@settings(max_examples=60, deadline=None, database=None)
@given(fold=st.sampled_from(FOLDS), gpn=st.sampled_from([2, 4, 8]),
       name=st.sampled_from(["tp", "cp", "dp", "ep", "etp", "edp", "pp", "dp_cp", "cp_tp",
                             "dp_cp_tp", "ep_etp", "world"]), data=st.data())
def test_span_counts_the_nodes_of_the_real_rank_set(fold, gpn, name, data):
    rank = data.draw(st.integers(0, fold.world_size - 1))
    ranks = group_of(fold, name, rank)
    nodes = {r // gpn for r in ranks}
    per_node = max(sum(1 for r in ranks if r // gpn == n) for n in nodes)
    assert span(fold, name, gpn) == (per_node, len(nodes)), (fold, name, ranks)


def test_alpha_beta_terms():
    hw = HARDWARE["h100"]
    fold = Fold(tp=8, ep=8, edp=2).resolve(16)
    inside = collective_time(Collective("all_gather", "tp", "forward", 1e8, 1, "", ""), fold, hw)
    bw = hw.nvlink_bandwidth * hw.link_efficiency
    assert inside == 7 * hw.nvlink_latency + 7 * 1e8 / bw
    # dp = 2 spans two nodes: one step through the NIC
    across = collective_time(Collective("reduce_scatter", "dp", "backward", 2e8, 3, "", ""),
                             fold, hw)
    assert across == 3 * (hw.network_latency + 0.5 * 2e8 / (hw.network_bandwidth
                                                            * hw.link_efficiency))
    # an all-to-all over 16 ranks on 2 nodes: 7 of 15 peers by NVLink, 8 through the NIC
    big = Fold(tp=1, ep=16).resolve(16)
    t = collective_time(Collective("all_to_all", "ep", "forward", 1.5e9, 1, "", ""), big, hw)
    net = 8 / 15 * 1.5e9 / (hw.network_bandwidth * hw.link_efficiency)
    assert t == 16 * hw.network_latency + net


def test_bubbles():
    fold = Fold(pp=4, tp=2).resolve(16)
    assert bubble_slots(Layout(fold, schedule="1F1B")) == 3
    assert bubble_slots(Layout(fold, schedule="GPipe")) == 3
    assert bubble_slots(Layout(fold, schedule="Interleaved1F1B", stages_per_rank=3)) == 1
    assert bubble_slots(Layout(Fold(tp=2).resolve(2))) == 0


def _sample_layouts():
    from foldmesh.models import preset
    from foldmesh.plan import Workload, layouts

    work = Workload(preset("mixtral-8x22b", capacity_factor=1.0), 256, 4096)
    return work, list(layouts(work, 64, HARDWARE["h100"]))[::53]


WORK, SAMPLE = _sample_layouts()


@settings(max_examples=40, deadline=None, database=None)
@given(layout=st.sampled_from(SAMPLE), gpu=st.sampled_from(["h100", "h200"]))
def test_estimates_add_up(layout, gpu):
    """Every part of the step time is a time (>= 0), the step is their sum, the compute is
    the sum of its kernels (calibrated fractions on H100, measured rates on H200), the
    exposed gradient sync is at most what its collectives take, and MFU follows from the
    step."""
    from foldmesh.plan import estimate
    from foldmesh.train.flops import flops_per_token

    hw = HARDWARE[gpu]
    assert (hw.rates is not None) == (gpu == "h200")
    e = estimate(WORK, layout, hw)
    assert all(v >= 0 for v in e.time.values()), e.time
    assert e.step_time == sum(e.time.values())
    assert all(v > 0 for v in e.compute_parts.values()), e.compute_parts
    assert sum(e.compute_parts.values()) == pytest.approx(e.time["compute"], rel=1e-12)
    assert e.largest_term()[1] <= e.step_time
    sync = sum(collective_time(c, layout.fold, hw) for c in e.collectives
               if c.scope == "step")
    assert e.time.get("dp", 0) + e.time.get("edp", 0) <= sync * (1 + 1e-9)
    tokens = WORK.global_batch * WORK.seq_len
    assert e.tokens_per_s_per_gpu == tokens / e.step_time / 64
    assert e.mfu == flops_per_token(WORK.model, WORK.seq_len) * tokens / (
        hw.peak_flops * 64 * e.step_time)
    assert 0 < e.mfu < e.mfu_megatron < 1


def test_the_trainers_peak_rates_are_the_presets(monkeypatch):
    """The trainer's MFU divides by the same peak the planner uses, found by device name."""
    import torch

    from foldmesh.train.flops import peak_flops

    assert peak_flops(torch.device("cpu")) is None
    for name, preset in [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                         ("NVIDIA B200", "b200"), ("NVIDIA A100-SXM4-80GB", "a100"),
                         ("NVIDIA H800", "h100")]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert peak_flops(torch.device("cuda", 0)) == HARDWARE[preset].peak_flops, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA T4")
    assert peak_flops(torch.device("cuda", 0)) is None


def test_a_learned_routers_imbalance_slows_the_experts_and_the_dispatch():
    """expert_imbalance (max/mean expert load) scales the routed experts' GEMMs and the
    dispatch all-to-alls by exactly that factor; the balanced case (moe.force_balance) is 1;
    padded experts and a capacity bound it; bytes stay the balanced ones."""
    from dataclasses import replace

    from foldmesh.models import preset
    from foldmesh.plan import Workload, estimate, hardware

    cfg = preset("mixtral-8x22b")
    layout = Layout(Fold(tp=2, ep=8, pp=8).resolve(128))
    hw = hardware("h200")
    even = estimate(Workload(cfg, 256, 4096), layout, hw)
    skew = estimate(Workload(cfg, 256, 4096, expert_imbalance=1.5), layout, hw)
    grouped = [k for k in even.compute_parts if k.startswith("grouped")]
    assert grouped
    for k in grouped:
        assert skew.compute_parts[k] == pytest.approx(1.5 * even.compute_parts[k])
    a2a = sum(collective_time(c, layout.fold, hw) for c in even.collectives
              if c.kind == "all_to_all" and c.group == "ep")
    assert a2a > 0
    assert skew.time["ep"] - even.time["ep"] == pytest.approx(0.5 * a2a)
    assert skew.step_time > even.step_time and skew.comm_bytes == even.comm_bytes
    capped = replace(cfg, capacity_factor=1.25)
    assert Workload(capped, 256, 4096, expert_imbalance=1.5).load_factor == 1.25
    padded = replace(cfg, capacity_factor=1.0, pad_to_capacity=True)
    assert Workload(padded, 256, 4096, pad_to_capacity=True,
                    expert_imbalance=3.0).load_factor == 1.0
    with pytest.raises(Exception, match="expert_imbalance must be >= 1"):
        Workload(cfg, 256, 4096, expert_imbalance=0.5)
