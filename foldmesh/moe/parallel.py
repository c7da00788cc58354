"""Apply the fold to an MoE layer: expert weights on the MoE view, tokens through the fold.

``apply_moe_parallel(moe, fm)`` makes a plain :class:`MoE` layer take attention activations
(DTensors ``[B, S, H]`` on ``fm.attn_stage``, placements ``(S0, S1, S1)``) and return them in
the same layout. Inside, each rank's tokens are re-interpreted on the MoE view (free, see
``foldmesh.to_moe``), routed, dispatched to the experts over ep x etp, combined, and
re-interpreted back. docs/placements.md lists every placement and collective.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import all_reduce
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from .._fold import FoldError
from .._mesh import FoldedMesh
from .._transition import _contiguous_stride, to_attn, to_moe
from ._dispatch import AllGatherDispatcher, AllToAllDispatcher
from .layer import MoE
from .router import Reductions

DISPATCHERS = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}
_TOKENS = (Shard(0), Shard(0), Shard(0))


class MeshReductions(Reductions):
    """The router's count sums over the fold's sub-meshes (no gradient flows through them)."""

    def __init__(self, fm: FoldedMesh):
        self.replica = fm["cp_tp"].get_group()
        self.stage = fm["dp_cp_tp"].get_group()
        self.replica_size = fm.fold.cp * fm.fold.tp
        self.stage_size = fm.fold.stage_size

    def replica_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce(t, "sum", self.replica) if self.replica_size > 1 else t

    def global_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce(t, "sum", self.stage) if self.stage_size > 1 else t


def apply_moe_parallel(moe: MoE, fm: FoldedMesh, dispatcher: str = "alltoall") -> MoE:
    """Fold ``moe`` onto ``fm`` in place and return it.

    Expert weights become DTensors on ``fm.moe_stage``: ``w_gate``/``w_up`` [E, H, F] and
    ``w_down`` [E, F, H] with placements ``(Replicate, Shard(0), Shard(F dim))``: experts over
    ep, FFN over etp, replicated over edp. Their gradients are ``Partial`` over edp.
    The shared expert's MLP is tensor-parallel over ``fm["tp"]`` (DTensor weights; gradients
    complete for the tp group's tokens, to be summed over ``fm["dp_cp"]``). The router gate
    and the shared expert's sigmoid gate keep plain replicated weights; their gradients are
    this rank's part and must be summed over the stage (``fm["dp_cp_tp"]``).

    Args:
        moe: a plain MoE layer, identical on every rank (same seed).
        fm: the folded mesh.
        dispatcher: "alltoall" (MoE Parallel Folding's dispatch) or "allgather".

    Raises:
        FoldError: experts not divisible by ep, FFN size not divisible by etp, or an unknown
            dispatcher.
    """
    if dispatcher not in DISPATCHERS:
        raise FoldError(f"dispatcher must be one of {sorted(DISPATCHERS)}, got {dispatcher!r}")
    fm.fold.check_experts(moe.num_experts)
    fm.fold.check_expert_ffn(moe.config.ffn_size)
    ex = moe.experts
    for name, ffn_dim in (("w_gate", 2), ("w_up", 2), ("w_down", 1)):
        w = getattr(ex, name)
        placements = (Replicate(), Shard(0), Shard(ffn_dim))
        setattr(ex, name, nn.Parameter(distribute_tensor(w.detach(), fm.moe_stage, placements)))
    if moe.shared_expert is not None and fm.fold.tp > 1:
        if moe.config.shared_ffn_size % fm.fold.tp:
            raise FoldError(
                f"shared expert FFN size = {moe.config.shared_ffn_size} is not divisible by "
                f"tp = {fm.fold.tp}; choose a shared_ffn_size that is a multiple of {fm.fold.tp}"
            )
        _shard_shared_expert(moe.shared_expert, fm)
    moe.router.reductions = MeshReductions(fm)
    moe.dispatcher = DISPATCHERS[dispatcher](fm, moe.num_experts)
    moe.register_forward_pre_hook(_make_pre_hook(fm))
    moe.register_forward_hook(_make_post_hook(fm))
    return moe


def _shard_shared_expert(shared, fm: FoldedMesh) -> None:
    """Tensor-parallel shared expert on the attention view's tp axis (sequence parallel in and
    out): all-gather the tp group's tokens, column-parallel gate/up, row-parallel down,
    reduce-scatter back to each rank's tokens. Its weights become DTensors on ``fm["tp"]``."""
    tp = fm["tp"]
    tokens = (Shard(0),)  # each rank's [n, H] tokens, sequence-parallel over tp
    parallelize_module(shared.mlp, tp, PrepareModuleInput(
        input_layouts=tokens, desired_input_layouts=(Replicate(),)))
    parallelize_module(shared.mlp, tp, {
        "gate_proj": ColwiseParallel(),
        "up_proj": ColwiseParallel(),
        "down_proj": RowwiseParallel(output_layouts=Shard(0)),
    })


def _make_pre_hook(fm: FoldedMesh):
    # The attention input is kept on the module between the two hooks: the way back needs
    # its shape and placements. A layer is not re-entered within its own forward.
    def pre_hook(module, args):
        (x,) = args
        if not isinstance(x, DTensor):
            raise FoldError("a folded MoE layer takes a DTensor [B, S, H] on fm.attn_stage")
        module._fold_like = x
        b, s = x.shape[0] // fm.fold.dp, x.shape[1] // (fm.fold.cp * fm.fold.tp)
        local = to_moe(x, fm, gather_etp=False).to_local(grad_placements=_TOKENS)
        # keep the sequence dim: the router's per-sequence loss needs it
        return (local.view(b, s, *x.shape[2:]),)

    return pre_hook


def _make_post_hook(fm: FoldedMesh):
    def post_hook(module, args, out):
        like = module.__dict__.pop("_fold_like")
        tokens = out.flatten(0, 1)
        shape = torch.Size((like.shape[0] * like.shape[1], *like.shape[2:]))
        y = DTensor.from_local(tokens, fm.moe_stage, _TOKENS, run_check=False, shape=shape,
                               stride=_contiguous_stride(shape))
        return to_attn(y, fm, like=like)

    return post_hook
