"""Data parallelism over a parallelized model: FSDP2, or replication with a gradient all-reduce.

Which ranks hold the same weights (so whose gradients must be summed):

=================================  ===========================  ==============================
weights                            mesh of the DTensor          gradient summed over
=================================  ===========================  ==============================
attention, dense MLP, embeddings,  ``fm["tp"]`` (or plain)      ``fm["dp_cp"]``
norms, router, shared expert
experts                            ``fm.expert_mesh`` (ep, etp)  ``fm["edp"]``
=================================  ===========================  ==============================

The gradient convention: each rank backpropagates the mean loss over its own tokens (the
same value on the tp ranks of a group, see ``foldmesh.cross_entropy``); the global loss is
the mean over the dp·cp shards. So every gradient is the *sum* over the ranks above divided
by dp·cp. FSDP2's default divides by its mesh size, which is right for dense weights (dp·cp
ranks) but wrong for experts whenever edp != dp·cp; ``apply_fsdp`` sets dp·cp for both, and
then asks FSDP2 for plain sums over edp followed by a division (a divide factor that is not
the mesh size would otherwise need a pre-multiplied sum, which gloo does not have).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from ._mesh import FoldedMesh
from .moe.parallel import FoldedExperts


def apply_fsdp(model: nn.Module, fm: FoldedMesh, *, mp_policy: MixedPrecisionPolicy | None = None,
               reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 the standard way for a folded model, in place: experts sharded over
    ``fm["edp"]``, everything else over ``fm["dp_cp"]``, one group per block plus the root
    (embeddings, final norm, output), gradients divided by dp·cp everywhere.

    Call after ``foldmesh.parallelize`` (and after loading weights, or before ``to_empty``
    when building on the meta device). The same lines written out are in the README.
    """
    kw = dict(mp_policy=mp_policy or MixedPrecisionPolicy(),
              reshard_after_forward=reshard_after_forward)
    factor = fm.fold.dp * fm.fold.cp
    for block in model.layers.values():
        ignored = set()
        for ex in (m for m in block.modules() if isinstance(m, FoldedExperts)):
            if fm.fold.edp > 1:
                fully_shard(ex, mesh=fm["edp"], shard_placement_fn=_expert_placement(ex, fm),
                            **kw)
                ex.set_gradient_divide_factor(factor)
                if factor != fm.fold.edp:
                    # FSDP2 would ask for a pre-multiplied sum (NCCL's PreMulSum), which gloo
                    # lacks: reduce with a plain sum and divide afterwards instead.
                    ex.set_force_sum_reduction_for_comms(True)
            else:
                # One copy of each expert shard: nothing to shard or reduce, only the scale.
                # (An FSDP group on a 1-rank mesh would also divide fp64 gradients twice.)
                ignored |= set(ex.parameters())
                scale_gradients(ex.parameters(), factor)
        fully_shard(block, mesh=fm["dp_cp"], ignored_params=ignored or None, **kw)
        block.set_gradient_divide_factor(factor)
    fully_shard(model, mesh=fm["dp_cp"], **kw)
    model.set_gradient_divide_factor(factor)
    return model


def _expert_placement(experts: FoldedExperts, fm: FoldedMesh):
    """Shard dim 0 (this rank's experts) over edp when it divides evenly, else dim 1: FSDP
    would pad fewer local experts than edp ranks with zeros."""
    local = experts.w_gate.to_local().shape[0]
    edp = fm.fold.edp

    def place(p: nn.Parameter) -> Shard:
        return Shard(0) if local % edp == 0 or p.shape[1] % edp else Shard(1)

    return place


def _parameters(model: nn.Module | Sequence[nn.Module]) -> list[nn.Parameter]:
    """The parameters of a model, or of this rank's pipeline stages (a list of modules)."""
    parts = [model] if isinstance(model, nn.Module) else list(model)
    return [p for part in parts for p in part.parameters()]


def scale_gradients(params, factor: float) -> None:
    """Divide every gradient contribution to ``params`` by ``factor`` as it is produced (so
    accumulation over micro-batches stays right)."""
    for p in params:
        p.register_hook(lambda g: g / factor)


def _reduce_group(p: nn.Parameter, fm: FoldedMesh) -> tuple[str, torch.Tensor]:
    """Which sub-mesh ``p``'s gradient is summed over, and the local tensor to reduce."""
    g = p.grad
    if not isinstance(g, DTensor):
        return "dp_cp", g
    if isinstance(p, DTensor) and p.device_mesh == fm.expert_mesh:
        return "edp", g.to_local()
    if any(isinstance(x, Partial) for x in g.placements):
        # replicated over tp (sequence-parallel norms): the tp partials join the sum
        return "dp_cp_tp", g.to_local()
    return "dp_cp", g.to_local()


@torch.no_grad()
def reduce_gradients(model: nn.Module | Sequence[nn.Module], fm: FoldedMesh) -> None:
    """Replication instead of FSDP: sum every gradient over the ranks holding the same weight
    (see the module table) and divide by dp·cp. Call after backward, before clipping and the
    optimizer step; one all-reduce per (group, dtype) on a flattened buffer. ``model`` may be
    this rank's pipeline stages (a list): the groups lie inside the stage."""
    buckets: dict[tuple[str, torch.dtype], list[tuple[nn.Parameter, torch.Tensor]]] = {}
    for p in _parameters(model):
        if p.grad is None:
            continue
        g = p.grad
        if (isinstance(p, DTensor) and isinstance(g, DTensor) and g.placements != p.placements
                and not any(isinstance(x, Partial) for x in g.placements)):
            # The vocabulary-parallel embedding's gradient comes back replicated over tp:
            # keep this rank's rows (a local slice), so the all-reduce carries only the shard.
            p.grad = g.redistribute(p.device_mesh, p.placements)
        name, local = _reduce_group(p, fm)
        buckets.setdefault((name, local.dtype), []).append((p, local))
    factor = fm.fold.dp * fm.fold.cp
    for (name, _), items in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        flat = torch.cat([local.reshape(-1) for _, local in items])
        mesh = fm[name]
        if mesh.size() > 1:
            dist.all_reduce(flat, group=mesh.get_group())
        flat /= factor
        offset = 0
        for p, local in items:
            n = local.numel()
            new = flat[offset:offset + n].view_as(local)
            offset += n
            if isinstance(p.grad, DTensor):
                placements = [Replicate() if isinstance(x, Partial) else x
                              for x in p.grad.placements]
                p.grad = DTensor.from_local(new, p.grad.device_mesh, placements,
                                            run_check=False, shape=p.grad.shape,
                                            stride=p.grad.stride())
            else:
                p.grad.copy_(new)


def _replicas(g: torch.Tensor, stage_size: int) -> int:
    """How many ranks of the stage hold this exact gradient shard."""
    if not isinstance(g, DTensor):
        return stage_size
    mesh = g.device_mesh
    copies = stage_size // mesh.size()
    for axis, placement in enumerate(g.placements):
        if isinstance(placement, Replicate):
            copies *= mesh.size(axis)
    return copies


@torch.no_grad()
def grad_norm(model: nn.Module | Sequence[nn.Module], fm: FoldedMesh) -> torch.Tensor:
    """The global L2 norm of all gradients (fp64 scalar, the same on every rank), each
    parameter counted exactly once whatever its mesh, sharding or replication. Gradients must
    be reduced first (FSDP does it in backward; otherwise ``reduce_gradients``).

    ``model`` may be this rank's pipeline stages (a list of modules): each pipeline stage holds
    its own parameters, so the one all-reduce over every rank (pp included) adds the stages up.
    """
    total = None
    stage = fm.fold.stage_size
    for p in _parameters(model):
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor) and any(isinstance(x, Partial) for x in g.placements):
            g = g.redistribute(placements=[Replicate() if isinstance(x, Partial) else x
                                           for x in g.placements])
        local = g.to_local() if isinstance(g, DTensor) else g
        sq = local.double().pow(2).sum() / _replicas(g, stage)
        total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros((), dtype=torch.float64)
    if fm.fold.world_size > 1:
        dist.all_reduce(total, group=fm.world.get_group())
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module | Sequence[nn.Module], fm: FoldedMesh, max_norm: float
                    ) -> torch.Tensor:
    """Scale all gradients so that their global norm is at most ``max_norm``; returns the
    norm before clipping (fp64 scalar). A non-finite norm leaves the gradients unscaled, so
    the caller can decide to skip the step. No host synchronisation. ``model``: a module or
    this rank's pipeline stages."""
    norm = grad_norm(model, fm)
    coeff = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    coeff = torch.where(torch.isfinite(norm), coeff, torch.ones_like(coeff))
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in _parameters(model):
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, grads in by_dtype.items():
        torch._foreach_mul_(grads, coeff.to(device=grads[0].device, dtype=dtype))
    return norm
