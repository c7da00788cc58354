"""One device mesh, two folded views of it.

``build_folded_mesh`` calls ``init_device_mesh`` once for a 1-D world mesh and unflattens it
twice: into the attention view ``(pp, dp, cp, tp)`` and into the MoE view ``(pp, edp, ep, etp)``.
Both views share the root mesh and its rank order, so a rank's coordinates in one view
determine its coordinates in the other; that is what makes the fold transition free.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ._fold import ATTN_AXES, MOE_AXES, Fold, FoldError

# Flattened sub-meshes built for composition, with the view they come from and what uses them.
FLATTENED = {
    # dense parameters are data-parallel over dp x cp, and the loss is averaged there
    "dp_cp": ("attn", ("dp", "cp")),
    # one data-parallel replica's micro-batch is spread over cp x tp (aux_loss counts)
    "cp_tp": ("attn", ("cp", "tp")),
    # every rank of a stage: global-batch statistics (global_aux_loss, expert bias)
    "dp_cp_tp": ("attn", ("dp", "cp", "tp")),
    # per-expert token counts are exchanged over ep x etp
    "ep_etp": ("moe", ("ep", "etp")),
}

# A size-1 axis never communicates: DTensor skips it, and so does foldmesh. It still needs a
# process group for DeviceMesh's bookkeeping; a single-rank "fake" group is free (it creates
# no communicator) and its collectives are identities, which is exactly right for one rank.
# Before torch 2.13 they are not: the fake group's scatter and all-gather leave the output
# buffer as allocated, so distribute_tensor over a mesh with a size-1 dim (etp = 1) handed
# out uninitialised shards. Older torch gets real single-rank groups instead.
_NOOP_BACKEND = "fake"
_NOOP_TORCH = (2, 13)
_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def _register_noop_backend() -> bool:
    """Register torch's single-process fake backend if torch has not; False if unavailable."""
    if _NOOP_BACKEND.upper() in dist.Backend._plugins:
        return True
    try:
        from torch._C._distributed_c10d import FakeProcessGroup

        create = FakeProcessGroup._create_internal
    except (ImportError, AttributeError):
        return False

    def _create(common_opts, backend_opts):
        return create(common_opts.group_rank, common_opts.group_size, backend_opts)

    dist.Backend.register_backend(
        _NOOP_BACKEND, _create, extended_api=True, devices=["cpu", "cuda"]
    )
    return True


class FoldedMesh:
    """The attention and MoE views of one world mesh, plus named sub-meshes.

    Attributes:
        fold: the resolved :class:`Fold` (dp and edp known).
        world: the 1-D root mesh ``("world",)`` both views are reshaped from.
        attn: view with dims ``("pp", "dp", "cp", "tp")``, tp fastest.
        moe: view with dims ``("pp", "edp", "ep", "etp")``, etp fastest.

    ``fm[name]`` returns a 1-D sub-mesh: any axis of either view (``"tp"``, ``"ep"``, ...) or a
    flattened group from ``FLATTENED`` (``"dp_cp"``, ``"cp_tp"``, ``"dp_cp_tp"``, ``"ep_etp"``).
    A flattened group with at most one axis of size > 1 is that axis' mesh, not a new group.
    """

    def __init__(self, fold: Fold, world: DeviceMesh, attn: DeviceMesh, moe: DeviceMesh):
        self.fold = fold
        self.world = world
        self.attn = attn
        self.moe = moe
        self._named: dict[str, DeviceMesh] = {}
        for name, (view, axes) in FLATTENED.items():
            self._named[name] = self._flatten(view, axes, name)

    def _view(self, view: str) -> DeviceMesh:
        return self.attn if view == "attn" else self.moe

    def _flatten(self, view: str, axes: tuple[str, ...], name: str) -> DeviceMesh:
        mesh = self._view(view)
        big = [a for a in axes if self.fold.size(a) > 1]
        if len(big) <= 1:
            return mesh[big[0] if big else axes[0]]
        return mesh[axes]._flatten(name)

    @property
    def attn_stage(self) -> DeviceMesh:
        """This rank's pipeline stage of the attention view, dims ``("dp", "cp", "tp")``.

        Attention activations are DTensors on this mesh."""
        return self.attn["dp", "cp", "tp"]

    @property
    def moe_stage(self) -> DeviceMesh:
        """This rank's pipeline stage of the MoE view, dims ``("edp", "ep", "etp")``.

        MoE activations and expert weights are DTensors on this mesh."""
        return self.moe["edp", "ep", "etp"]

    @property
    def expert_mesh(self) -> DeviceMesh:
        """This rank's ``("ep", "etp")`` mesh, 2-D: expert weights are DTensors on it (experts
        over ep, FFN over etp), replicated over edp, over which data parallelism (FSDP)
        shards or reduces them."""
        return self.moe["ep", "etp"]

    def __getitem__(self, name: str) -> DeviceMesh:
        if name in self._named:
            return self._named[name]
        if name in ATTN_AXES:
            return self.attn[name]
        if name in MOE_AXES:
            return self.moe[name]
        known = sorted(set(ATTN_AXES + MOE_AXES)) + sorted(FLATTENED)
        raise KeyError(f"no sub-mesh named {name!r}; available: {known}")

    def coordinate(self, axis: str) -> int:
        """This rank's index along ``axis`` (0 for size-1 axes)."""
        return self[axis].get_local_rank()

    def groups(self, axis: str) -> list[list[int]]:
        """Every rank group of ``axis`` across the world, each in axis order (for display)."""
        view = self.attn if axis in ATTN_AXES else self.moe
        names = view.mesh_dim_names
        mesh = view.mesh.movedim(names.index(axis), -1)
        return mesh.reshape(-1, mesh.shape[-1]).tolist()

    def destroy(self) -> None:
        """Destroy every process group these views created (not the default group).

        Long-lived programs build one FoldedMesh; tests that build many release them here,
        since each gloo group keeps its own threads and sockets. Call it on every rank, and
        only once no DTensor on these meshes is used again: DTensor caches layouts per mesh.
        """
        meshes = [self.attn, self.moe, *self._named.values()]
        names = {n for m in meshes for n in getattr(m, "_dim_group_names", [])}
        default = dist.distributed_c10d._get_default_group()
        for name in sorted(names):
            pg = dist.distributed_c10d._resolve_process_group(name)
            if pg is not None and pg is not default:
                dist.destroy_process_group(pg)
        # DTensor caches sharding decisions by mesh value: a mesh built later for the same
        # fold compares equal to these and would be handed specs on the destroyed groups.
        try:
            from torch.distributed.tensor.debug import _clear_sharding_prop_cache
        except ImportError:  # an older torch without the helper keeps its cache
            return
        _clear_sharding_prop_cache()

    def __repr__(self) -> str:
        return f"FoldedMesh({self.fold}, device_type={self.world.device_type!r})"


def build_folded_mesh(fold: Fold, device_type: str = "cpu") -> FoldedMesh:
    """Build both views of ``fold`` on the default process group.

    Every rank must call this with the same fold. The fold is resolved and checked against
    the world size before any process group is created.

    Args:
        fold: the parallel degrees; dp and edp may be -1 (inferred).
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (nccl), as for ``init_device_mesh``.

    Raises:
        FoldError: the fold does not fit, or no process group is initialized.
    """
    if not dist.is_initialized():
        raise FoldError(
            "no process group: launch with torchrun and call "
            "torch.distributed.init_process_group() before Fold.build()"
        )
    fold = fold.resolve(dist.get_world_size())
    noop = _TORCH >= _NOOP_TORCH and _register_noop_backend()

    def overrides(names: tuple[str, ...], sizes: tuple[int, ...]) -> dict[str, str] | None:
        if not noop:
            return None
        return {n: _NOOP_BACKEND for n, s in zip(names, sizes, strict=True) if s == 1} or None

    world = init_device_mesh(device_type, (fold.world_size,), mesh_dim_names=("world",))
    attn = world._unflatten(
        0, fold.attn_sizes(), ATTN_AXES, overrides(ATTN_AXES, fold.attn_sizes())
    )
    moe = world._unflatten(0, fold.moe_sizes(), MOE_AXES, overrides(MOE_AXES, fold.moe_sizes()))
    return FoldedMesh(fold, world, attn, moe)
