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
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from .._fold import FoldError
from .._mesh import FoldedMesh
from .._transition import _contiguous_stride, to_attn, to_moe
from ._dispatch import AllGatherDispatcher, AllToAllDispatcher
from .experts import GroupedExperts
from .layer import MoE
from .router import Reductions

DISPATCHERS = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}
_TOKENS = (Shard(0), Shard(0), Shard(0))


class MeshReductions(Reductions):
    """The router's sums over the fold's sub-meshes."""

    def __init__(self, fm: FoldedMesh):
        self.replica = fm["cp_tp"].get_group()
        self.stage = fm["dp_cp_tp"].get_group()
        self.replica_size = fm.fold.cp * fm.fold.tp
        self.stage_size = fm.fold.stage_size
        self.tp = fm["tp"]

    def replica_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce(t, "sum", self.replica) if self.replica_size > 1 else t

    def global_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce(t, "sum", self.stage) if self.stage_size > 1 else t

    def shared_weight(self, w: torch.Tensor) -> torch.Tensor:
        # Replicated over tp, partial gradient out: from_local's backward all-reduces it.
        if self.tp.size() == 1:
            return w
        return DTensor.from_local(w, self.tp, (Replicate(),), run_check=False).to_local(
            grad_placements=(Partial(),))


class FoldedExperts(GroupedExperts):
    """``GroupedExperts`` whose weights are DTensors on ``fm.expert_mesh`` (experts over ep,
    FFN over etp); forward computes on this rank's shards. Parameter names are unchanged.

    The gradient of each shard is this rank's tokens' part, to be summed over edp (the ranks
    holding the same shard see different tokens): FSDP over ``fm["edp"]`` or
    ``foldmesh.reduce_gradients`` does it.
    """

    def __init__(self, experts: GroupedExperts, fm: FoldedMesh):
        nn.Module.__init__(self)
        self.init_std = experts.init_std
        for name, ffn_dim in (("w_gate", 2), ("w_up", 2), ("w_down", 1)):
            w = distribute_tensor(getattr(experts, name).detach(), fm.expert_mesh,
                                  (Shard(0), Shard(ffn_dim)))
            setattr(self, name, nn.Parameter(w))

    def forward(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """tokens [M, H] grouped by local expert, counts [E/ep] -> [M, H]; a partial sum over
        etp when etp > 1."""
        shards = [w.to_local(grad_placements=w.placements)
                  for w in (self.w_gate, self.w_up, self.w_down)]
        return self.compute(tokens, counts, *shards)


def apply_moe_parallel(moe: MoE, fm: FoldedMesh, dispatcher: str = "alltoall") -> MoE:
    """Fold ``moe`` onto ``fm`` in place and return it.

    Expert weights become DTensors on ``fm.expert_mesh`` (dims ep, etp): ``w_gate``/``w_up``
    [E, H, F] and ``w_down`` [E, F, H] with placements ``(Shard(0), Shard(F dim))``: experts
    over ep, FFN over etp. They are replicated over edp, and their gradients are this rank's
    tokens' part, to be summed over ``fm["edp"]``.

    Every other weight ends with a gradient complete for the rank's tp group, to be summed
    over ``fm["dp_cp"]`` as the attention weights' are: the shared expert's MLP is
    tensor-parallel over ``fm["tp"]``, its sigmoid gate a replicated DTensor on ``fm["tp"]``
    (``Partial`` gradient, reduced over tp by DTensor or FSDP), and the router gate a plain
    weight whose gradient is all-reduced over tp in backward.

    The layer then takes ``[B, S, H]`` activations as a DTensor on ``fm.attn_stage`` with
    ``(Shard(0), Shard(1), Shard(1))``, a sequence-parallel DTensor on ``fm["tp"]`` with
    ``Shard(1)``, or a plain tensor holding this rank's own block; it returns the same kind.

    Args:
        moe: a plain MoE layer, identical on every rank (same seed), or on the meta device.
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
    moe.experts = FoldedExperts(moe.experts, fm)
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
    reduce-scatter back to each rank's tokens. Its weights become DTensors on ``fm["tp"]``;
    the one-column sigmoid gate is replicated and runs on each rank's own tokens."""
    tp = fm["tp"]
    tokens = (Shard(0),)  # each rank's [n, H] tokens, sequence-parallel over tp
    parallelize_module(shared.mlp, tp, PrepareModuleInput(
        input_layouts=tokens, desired_input_layouts=(Replicate(),)))
    parallelize_module(shared.mlp, tp, {
        "gate_proj": ColwiseParallel(),
        "up_proj": ColwiseParallel(),
        "down_proj": RowwiseParallel(output_layouts=Shard(0)),
    })
    if shared.gate is not None:
        parallelize_module(shared.gate, tp, SequenceParallel(sequence_dim=0,
                                                             use_local_output=True))


def _make_pre_hook(fm: FoldedMesh):
    # What came in is kept on the module between the two hooks: the way back needs its
    # shape and placements. A layer is not re-entered within its own forward.
    def pre_hook(module, args):
        (x,) = args
        b = x.shape[0] // fm.fold.dp
        if isinstance(x, DTensor) and x.device_mesh == fm.attn_stage:
            module._fold_like = x
            s = x.shape[1] // (fm.fold.cp * fm.fold.tp)
            local = to_moe(x, fm, gather_etp=False).to_local(grad_placements=_TOKENS)
            # keep the sequence dim: the router's per-sequence loss needs it
            return (local.view(b, s, *x.shape[2:]),)
        # This rank's own block [b, s, H], plain or a sequence-parallel DTensor on fm["tp"]:
        # it already is this rank's share of the MoE tokens (the re-interpretation is free).
        module._fold_like = x
        if isinstance(x, DTensor):
            if x.device_mesh != fm["tp"] or tuple(x.placements) != (Shard(1),):
                raise FoldError(
                    "a folded MoE layer takes a DTensor [B, S, H] on fm.attn_stage, a "
                    "sequence-parallel DTensor on fm['tp'] with Shard(1), or this rank's "
                    f"local block; got a DTensor on {x.device_mesh} with {x.placements}"
                )
            x = x.to_local(grad_placements=x.placements)
        if x.dim() != 3:
            raise FoldError(f"a folded MoE layer takes [B, S, H] activations, got {x.shape}")
        return (x,)

    return pre_hook


def _make_post_hook(fm: FoldedMesh):
    def post_hook(module, args, out):
        like = module.__dict__.pop("_fold_like")
        if not isinstance(like, DTensor):
            return out
        if like.device_mesh != fm.attn_stage:
            return DTensor.from_local(out, like.device_mesh, like.placements, run_check=False,
                                      shape=like.shape, stride=like.stride())
        tokens = out.flatten(0, 1)
        shape = torch.Size((like.shape[0] * like.shape[1], *like.shape[2:]))
        y = DTensor.from_local(tokens, fm.moe_stage, _TOKENS, run_check=False, shape=shape,
                               stride=_contiguous_stride(shape))
        return to_attn(y, fm, like=like)

    return post_hook
