"""bf16 end to end: under autocast the MoE token path computes in bf16, the router in fp32.

One process, a Qwen2-style debug model (dense first layer, routed experts, gated shared
expert) under ``torch.autocast("cpu", torch.bfloat16)``, as the trainer's bf16 replication
runs it. Every matrix product of one forward and backward is counted by the dtypes of its
two operands: aten's (through a dispatch mode and torch's own FLOP formulas) and the Triton
grouped GEMM's launches (which aten never sees). At least 95% of the FLOPs must be
bf16 x bf16, the routed experts' GEMMs all of them.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from foldmesh.kernels import _grouped_gemm_ref
from foldmesh.kernels._backend import interpreter_problem
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from foldmesh.models import Transformer, preset

aten = torch.ops.aten
# CPU attention has its own op, with the flash kernels' arguments
FORMULAS = dict(flop_registry)
FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu] = \
    flop_registry[aten._scaled_dot_product_flash_attention]
FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
    flop_registry[aten._scaled_dot_product_flash_attention_backward]
# where the two operands of the product are
OPERANDS = {aten.addmm: (1, 2), aten.baddbmm: (1, 2),
            aten._scaled_dot_product_flash_attention_for_cpu_backward: (1, 2),
            aten._scaled_dot_product_flash_attention_backward: (1, 2)}


class MatmulDtypes(TorchDispatchMode):
    """FLOPs of every aten matrix product by (dtype, dtype) of its operands."""

    def __init__(self):
        super().__init__()
        self.flops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in FORMULAS:
            a, b = OPERANDS.get(packet, (0, 1))
            self.flops[(args[a].dtype, args[b].dtype)] += FORMULAS[packet](
                *args, **kwargs, out_val=out)
        return out


def _grouped_flops(x, w_or_dy, offsets, counter, name, fn):
    """Record one grouped GEMM launch: its operand dtypes and 2·rows·K·M FLOPs."""
    rows = int(offsets[-1]) if offsets.numel() else 0
    if name == "wgrad":
        k, m = x.shape[1], w_or_dy.shape[1]
    else:
        k, m = w_or_dy.shape[1], w_or_dy.shape[2]
    counter[(x.dtype, w_or_dy.dtype)] += 2 * rows * k * m
    return fn(x, w_or_dy, offsets)


def _model():
    cfg = preset("debug-qwen2", hidden_size=64, expert_ffn_size=64, ffn_size=64,
                 shared_ffn_size=32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    return model, ids


def _count(model, ids, experts: Counter | None = None) -> Counter:
    mode = MatmulDtypes()
    with mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    return mode.flops + (experts or Counter())


BF16 = (torch.bfloat16, torch.bfloat16)


def _check(flops: Counter, expert_flops: int) -> None:
    total = sum(flops.values())
    share = flops[BF16] / total
    assert share >= 0.95, f"bf16 x bf16 share {share:.3f}: {dict(flops)}"
    assert expert_flops > 0
    # the fp32 products left are the router's (its dtype is its own setting)
    fp32 = flops[(torch.float32, torch.float32)]
    assert fp32 + flops[BF16] == total, dict(flops)


def test_torch_path_runs_the_experts_in_bf16(monkeypatch):
    monkeypatch.setenv("FOLDMESH_KERNELS", "torch")
    model, ids = _model()
    seen = Counter()
    real = _grouped_gemm_ref.grouped_gemm_ref

    def spy(x, w, offsets):
        seen[(x.dtype, w.dtype)] += 1
        return real(x, w, offsets)

    monkeypatch.setattr("foldmesh.moe.experts.grouped_gemm",
                        lambda x, w, offsets: spy(x, w, offsets))
    flops = _count(model, ids)
    assert set(seen) == {BF16}, seen  # every routed expert GEMM, forward
    _check(flops, sum(seen.values()))


@pytest.mark.skipif(interpreter_problem() is not None, reason=str(interpreter_problem()))
def test_triton_path_runs_the_experts_in_bf16(monkeypatch):
    from foldmesh.kernels import _grouped_gemm

    monkeypatch.setenv("FOLDMESH_KERNELS", "triton")
    model, ids = _model()
    experts: Counter = Counter()
    for name in ("grouped_gemm_fwd", "grouped_gemm_wgrad"):
        real = getattr(_grouped_gemm, name)
        kind = "wgrad" if name.endswith("wgrad") else "fwd"
        monkeypatch.setattr(_grouped_gemm, name,
                            lambda x, w, o, real=real, kind=kind:
                            _grouped_flops(x, w, o, experts, kind, real))
    flops = _count(model, ids, experts)
    assert set(experts) == {BF16}, experts  # forward, input and weight gradients
    _check(flops, sum(experts.values()))


def test_moe_output_and_gradients_follow_autocast():
    """Under autocast the layer returns the compute dtype (as a linear layer would), and
    the fp32 weights get fp32 gradients."""
    model, ids = _model()
    moe = model.layers["1"].ffn
    x = torch.randn(2, 16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert moe.experts.w_gate.grad.dtype == torch.float32
    assert moe.router.weight.grad.dtype == torch.float32
    with torch.no_grad():
        plain = moe(x)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(y.detach().float(), plain, rtol=5e-2,
                               atol=5e-2 * plain.abs().max().item())
