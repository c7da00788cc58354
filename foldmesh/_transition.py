"""The fold transition: attention activations to MoE tokens and back.

Dimension legend: B batch, S sequence, H hidden (any trailing dims), N = B*S tokens.

Attention activations are DTensors ``[B, S, *]`` on ``fm.attn_stage`` (dims dp, cp, tp) with
placements ``(Shard(0), Shard(1), Shard(1))``: batch over dp, sequence over cp and then, in the
sequence-parallel regions around an MoE layer, over tp. MoE activations are token-major DTensors
``[N, *]`` on ``fm.moe_stage`` (dims edp, ep, etp) sharded on dim 0 over all three axes.

Why the re-interpretation is free: both stage meshes list the same ranks in the same order
(``tp + tp*cp + tp*cp*dp`` strides equal ``etp + etp*ep + etp*ep*edp`` strides flattened), so a
rank's position in the attention stage equals its position in the MoE stage. Sharding ``[N, *]``
on dim 0 over (edp, ep, etp) hands rank ``r`` the ``r``-th contiguous block of tokens. Declaring
each rank's local ``[b, s, *]`` block, flattened, to be that ``r``-th block moves no data: it only
fixes which global token index each local token gets. The token order of the MoE tensor is
therefore rank-major, not batch-major; token-wise layers (router, experts) do not care, and the
way back applies the inverse re-interpretation.

Gradients: each re-interpretation is a ``to_local``/``from_local`` pair with the gradient's
placements set to the forward placements on both sides, so the backward is the same free
re-interpretation in reverse. Collectives happen only in ``redistribute`` over etp:

=================  ==============================  ==============================
transition         forward                         backward
=================  ==============================  ==============================
to_moe, etp = 1    none                            none
to_moe, etp > 1    all-gather over etp (S0 -> R)   reduce-scatter over etp (P -> S0)
to_attn, etp = 1   none                            none
to_attn, P -> S0   reduce-scatter over etp         all-gather over etp
to_attn, R -> S0   local slice, no collective      all-gather over etp
=================  ==============================  ==============================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from ._fold import FoldError
from ._mesh import FoldedMesh

_ATTN = {"dp": Shard(0), "cp": Shard(1), "tp": Shard(1)}
_MOE_SHARDED = (Shard(0), Shard(0), Shard(0))


def _check_attn(x: DTensor, fm: FoldedMesh) -> None:
    if not isinstance(x, DTensor):
        raise TypeError(f"to_moe expects a DTensor on fm.attn_stage, got {type(x).__name__}")
    if x.device_mesh != fm.attn_stage:
        raise FoldError(
            f"to_moe expects a DTensor on fm.attn_stage {fm.attn_stage}, got one on "
            f"{x.device_mesh}; build activations with fm.attn_stage"
        )
    if x.ndim < 2:
        raise FoldError(f"attention activations must be [B, S, ...], got shape {tuple(x.shape)}")
    for axis, got in zip(("dp", "cp", "tp"), x.placements, strict=True):
        want = _ATTN[axis]
        if fm.fold.size(axis) > 1 and got != want:
            hint = ""
            if axis == "tp":
                hint = (
                    "; MoE layers need sequence parallelism when tp > 1 (otherwise every tp "
                    "rank would route the same tokens): shard the sequence over tp"
                )
            raise FoldError(
                f"attention activations must be {want} over {axis} (size "
                f"{fm.fold.size(axis)}), got {got}{hint}"
            )
    B, S = x.shape[0], x.shape[1]
    if B % fm.fold.dp:
        raise FoldError(
            f"batch size {B} is not divisible by dp = {fm.fold.dp}: every rank must hold the "
            f"same number of tokens; use a batch size that is a multiple of {fm.fold.dp}"
        )
    seq_split = fm.fold.cp * fm.fold.tp
    if S % seq_split:
        raise FoldError(
            f"sequence length {S} is not divisible by cp*tp = {fm.fold.cp}*{fm.fold.tp} = "
            f"{seq_split}: every rank must hold the same number of tokens; pad the sequence to a "
            f"multiple of {seq_split}"
        )


def to_moe(x: DTensor, fm: FoldedMesh, *, gather_etp: bool = True) -> DTensor:
    """Re-interpret attention activations as MoE tokens.

    Args:
        x: ``[B, S, *]`` DTensor on ``fm.attn_stage`` with placements
            ``(Shard(0), Shard(1), Shard(1))``; axes of size 1 may carry any placement.
        fm: the folded mesh.
        gather_etp: replicate the tokens over etp (one all-gather when etp > 1), as experts
            whose FFN dim is split over etp need. False keeps them sharded over etp, for a
            dispatcher that gathers over etp itself after the all-to-all.

    Returns:
        ``[B*S, *]`` DTensor on ``fm.moe_stage`` with placements ``(Shard(0), Shard(0), R)``
        (or ``Shard(0)`` over etp when ``gather_etp`` is False). Its token order is rank-major;
        see the module docstring.
    """
    _check_attn(x, fm)
    local = x.to_local(grad_placements=x.placements)
    tokens = local.flatten(0, 1)
    n = x.shape[0] * x.shape[1]
    shape = torch.Size((n, *x.shape[2:]))
    y = DTensor.from_local(
        tokens, fm.moe_stage, _MOE_SHARDED, run_check=False, shape=shape,
        stride=_contiguous_stride(shape),
    )
    if gather_etp and fm.fold.etp > 1:
        y = y.redistribute(fm.moe_stage, (Shard(0), Shard(0), Replicate()))
    return y


def to_attn(
    y: DTensor,
    fm: FoldedMesh,
    *,
    like: DTensor | None = None,
    shape: Sequence[int] | None = None,
    placements: Sequence[Placement] | None = None,
) -> DTensor:
    """Re-interpret MoE tokens as attention activations; the inverse of :func:`to_moe`.

    Args:
        y: ``[N, *]`` DTensor on ``fm.moe_stage`` with ``Shard(0)`` over edp and ep and
            ``Partial``, ``Replicate`` or ``Shard(0)`` over etp.
        fm: the folded mesh.
        like: the attention activation this MoE tensor came from; its global shape
            ``[B, S, *]`` and placements are reused. Alternatively pass ``shape`` and
            ``placements`` (default: ``(Shard(0), Shard(1), Shard(1))``).

    Returns:
        ``[B, S, *]`` DTensor on ``fm.attn_stage``. A ``Partial`` input is reduce-scattered over
        etp; a ``Replicate`` one is sliced locally.
    """
    if not isinstance(y, DTensor) or y.device_mesh != fm.moe_stage:
        raise FoldError("to_attn expects a DTensor on fm.moe_stage (as returned by to_moe)")
    if like is not None:
        shape, placements = like.shape, like.placements
    if shape is None:
        raise FoldError("to_attn needs the attention shape: pass like= or shape=")
    placements = tuple(placements) if placements is not None else tuple(_ATTN.values())
    shape = torch.Size(shape)
    if shape[0] * shape[1] != y.shape[0] or tuple(shape[2:]) != tuple(y.shape[1:]):
        raise FoldError(
            f"MoE tokens of shape {tuple(y.shape)} cannot become attention activations of "
            f"shape {tuple(shape)}: B*S must equal the token count and trailing dims must match"
        )
    for axis, got in zip(("edp", "ep"), y.placements[:2], strict=True):
        if fm.fold.size(axis) > 1 and got != Shard(0):
            raise FoldError(f"MoE tokens must be Shard(0) over {axis}, got {got}")
    if y.placements[2] != Shard(0):
        if not isinstance(y.placements[2], (Partial, Replicate, Shard)):
            raise FoldError(f"unsupported placement over etp: {y.placements[2]}")
        y = y.redistribute(fm.moe_stage, _MOE_SHARDED)
    local = y.to_local(grad_placements=_MOE_SHARDED)
    local = local.reshape(shape[0] // fm.fold.dp, shape[1] // (fm.fold.cp * fm.fold.tp), *shape[2:])
    return DTensor.from_local(
        local, fm.attn_stage, placements, run_check=False, shape=shape,
        stride=_contiguous_stride(shape),
    )


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))
