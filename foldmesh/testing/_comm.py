"""Count the collectives a piece of code issues: kind, fold axis, bytes, direction.

    counter = CollectiveCounter(fm)
    with counter:
        loss = model(x).sum()
        loss.backward()
    counter.bytes_by()   # {("all_to_all", "ep", "forward"): 3072, ...}
    print(counter.table())

``CollectiveCounter`` is a ``TorchDispatchMode``: every c10d op (``torch.distributed``'s
eager API, FSDP2, pipelining's send/recv), every functional collective (DTensor's
``redistribute``, ``torch.distributed._functional_collectives`` and their autograd variants)
and DTensor's ``shard_dim_alltoall`` that passes through the dispatcher on this thread while
the counter is active becomes one :class:`CollectiveRecord` (a functional batch of P2P ops,
one per send or receive). ``wait_tensor`` is not a collective and is not recorded.

What is seen, and what is not (tests/test_comm_counter.py checks each claim marked
"tested" on gloo, torch 2.13):

* Backward (tested). The autograd engine runs a CPU backward on the thread that called
  ``backward()``, so its collectives are recorded: DTensor's redistribute backward, the
  functional collectives' autograd backward, FSDP2's post-backward reduce-scatter (FSDP2
  overlaps through CUDA streams, not threads) and the forward that activation
  checkpointing recomputes. For CUDA tensors the engine runs backward on its device
  threads; it installs the caller's thread-local state there (``GraphTask.thread_locals_``,
  an ``at::ThreadLocalState`` that carries the dispatch-mode stack), so the mode should be
  active there too. Not run here: this path needs a GPU.
* Pipelining (tested). ``torch.distributed.pipelining``'s schedules send and receive with
  ``dist.isend``/``irecv`` or ``batch_isend_irecv`` on the calling thread: every send/recv
  is recorded, on ``"pp"``. On torch 2.13 a schedule's first step also runs a P2P warm-up
  (a vote exchanged as small tensors): count from the second step for per-step totals.
* Other threads are not seen (tested). A dispatch mode is thread-local: a collective issued
  on a thread the code starts itself (``threading.Thread``, the background thread of
  ``torch.distributed.checkpoint.async_save``) is not recorded.
* Calls that bypass the dispatcher are not seen: methods called directly on a backend
  object (``pg._get_backend(device).allreduce(...)``) and the TCP-store exchanges of
  process-group creation. Graphs compiled by ``torch.compile`` were not checked.
* A tensor subclass other than DTensor runs as it is (FakeTensor, which DTensor's sharding
  propagation uses, must not be handed back): collectives such a subclass issues inside
  its own ``__torch_dispatch__`` are not seen.
* Direction is the autograd engine's state, nothing else: ``"backward"`` when the op is
  issued while the engine runs a backward (``torch._C._current_graph_task_id() != -1``,
  final callbacks included), ``"forward"`` otherwise. So a recomputed forward is
  ``"backward"`` and a pipeline schedule's gradient send/recv between stages, which the
  schedule issues between its backward calls rather than inside one, is ``"forward"``
  (tested).

Bytes: the logical payload per rank, in bytes of the tensors this rank hands to the
collective (``numel * element_size``, including any padding DTensor or FSDP adds for uneven
shards), not what an algorithm puts on the wire (a ring all-reduce sends ``2(g-1)/g`` of
it). Per kind:

======================  ==============================================================
kind                    ``bytes`` (per rank, in a group of g ranks)
======================  ==============================================================
``all_reduce``          the tensor (input = output); summed over a coalesced list
``all_gather``          this rank's input shard (the output is g times it)
``reduce_scatter``      the whole input (g times the output shard)
``all_to_all``          the input rows this rank sends to the other g-1 ranks; the
                        block it keeps (its own input split) is a local copy, excluded
``broadcast``           the tensor, on the root and on every receiver
``reduce``              the tensor
``gather``              this rank's input
``scatter``             this rank's output chunk
``send``, ``recv``      the tensor sent, the tensor received
``barrier``             0
======================  ==============================================================

An analytic planner then predicts, per collective, the bytes of one tensor it already
knows: the activation or gradient for all-reduce, all-gather and reduce-scatter, and for an
all-to-all the rows routed to other ranks.

Axis: the fold axis whose process group the op ran on, found by matching the group against
every group of ``fm`` (``CollectiveCounter.axis_of`` gives the label of any name). Several
names can share one process group:

* a flattened name with at most one axis of size > 1 is that axis' own mesh
  (``FoldedMesh._flatten``): ``"ep_etp"`` with etp = 1 is the ep group;
* torch's DeviceMesh reuses the default process group for every mesh dim that spans the
  whole world (except for a gloo default group on a machine with CUDA, where it makes a
  new group per dim): with pp = 1, ``"dp_cp_tp"``, ``"ep_etp"`` (edp = 1) and any single
  axis of the stage's size are all the ``"world"`` group.

The label is then the most specific of those names: a single axis of either view beats a
flattened name, which beats ``"world"``; names equally specific (only world-spanning
groups: tp = ep = 8 on 8 ranks) are joined with ``"="`` in ``AXIS_NAMES`` order
(``"tp=ep"``), because no rule can tell which one the caller meant. ``record.aliases``
lists every name of the group. A group ``fm`` does not hold is ``"default"`` if it is the
default process group and ``"unknown"`` otherwise; without ``fm`` every group is one of
those two.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from .._fold import ATTN_AXES, MOE_AXES
from .._mesh import FLATTENED, FoldedMesh

# Every name a record's axis can carry, in the order ties are joined.
AXES = ("tp", "cp", "dp", "pp", "ep", "etp", "edp")
AXIS_NAMES = (*AXES, *FLATTENED, "world")
KEYS = ("kind", "axis", "direction")


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective as one rank issued it.

    Attributes:
        kind: ``"all_reduce"``, ``"all_gather"``, ``"reduce_scatter"``, ``"all_to_all"``,
            ``"broadcast"``, ``"reduce"``, ``"gather"``, ``"scatter"``, ``"send"``,
            ``"recv"`` or ``"barrier"``.
        axis: the fold axis of the op's process group (see the module docstring).
        group_size: ranks in that group.
        bytes: the logical payload of this rank, int, per the module docstring's table.
        direction: ``"forward"`` or ``"backward"`` (issued inside an autograd backward).
        op: the dispatcher op, e.g. ``"_c10d_functional::all_to_all_single"``.
        group: the c10d group name.
        aliases: every fold name of that group (empty for ``"default"``/``"unknown"``).
        ranks: the group's global ranks, in group-rank order (the same on every member,
            whatever names the fold gives it: what ``foldmesh.testing.order_mismatches``
            keys on).
    """

    kind: str
    axis: str
    group_size: int
    bytes: int
    direction: str
    op: str
    group: str
    aliases: tuple[str, ...]
    ranks: tuple[int, ...] = ()


# ----------------------------------------------------------------------------- payloads
def _nbytes(x: Any) -> int:
    """Bytes of a tensor or of every tensor in a (nested) list."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _sent_rows(t: torch.Tensor, splits: Sequence[int], size: int, rank: int) -> int:
    """Bytes of ``t``'s dim-0 rows sent to other ranks; empty ``splits`` is an even split."""
    rows = t.shape[0] if t.dim() else 1
    splits = [int(s) for s in splits] or [rows // size] * size
    row = _nbytes(t) // rows if rows else 0
    return (sum(splits) - splits[rank]) * row


def _shard_dim_sent(t: torch.Tensor, shard_dim: int, size: int, rank: int) -> int:
    # shard_dim_alltoall sends chunk i of shard_dim (torch.chunk's sizes) to group rank i
    chunks = t.chunk(size, dim=shard_dim)
    kept = chunks[rank].numel() if rank < len(chunks) else 0
    return (t.numel() - kept) * t.element_size()


def _p2p_batch(a: dict, size: int, rank: int) -> list[tuple[str, int]]:
    kinds = {"isend": "send", "irecv": "recv"}
    return [(kinds.get(op, op), _nbytes(t)) for op, t in zip(a["op_list"], a["tensors"],
                                                            strict=True)]


_Payload = Callable[[dict, int, int], list[tuple[str, int]]]


def _of(kind: str, arg: str) -> _Payload:
    return lambda a, size, rank: [(kind, _nbytes(a[arg]))]


_C10D: dict[str, _Payload] = {
    "allreduce_": _of("all_reduce", "tensors"),
    "allreduce_coalesced_": _of("all_reduce", "tensors"),
    "allgather_": _of("all_gather", "input_tensors"),
    "_allgather_base_": _of("all_gather", "input_tensor"),
    "allgather_coalesced_": _of("all_gather", "input_list"),
    "allgather_into_tensor_coalesced_": _of("all_gather", "inputs"),
    "reduce_scatter_": _of("reduce_scatter", "input_tensors"),
    "_reduce_scatter_base_": _of("reduce_scatter", "input_tensor"),
    "reduce_scatter_tensor_coalesced_": _of("reduce_scatter", "inputs"),
    "alltoall_base_": lambda a, size, rank: [("all_to_all", _sent_rows(
        a["input"], a["input_split_sizes"], size, rank))],
    "alltoall_": lambda a, size, rank: [("all_to_all", sum(
        _nbytes(t) for i, t in enumerate(a["input_tensors"]) if i != rank))],
    "broadcast_": _of("broadcast", "tensors"),
    "reduce_": _of("reduce", "tensors"),
    "gather_": _of("gather", "input_tensors"),
    "scatter_": _of("scatter", "output_tensors"),
    "send": _of("send", "tensors"),
    "recv_": _of("recv", "tensors"),
    "recv_any_source_": _of("recv", "tensors"),
    "barrier": lambda a, size, rank: [("barrier", 0)],
    "monitored_barrier_": lambda a, size, rank: [("barrier", 0)],
}
_FUNCTIONAL: dict[str, _Payload] = {
    "all_reduce": _of("all_reduce", "input"),
    "all_reduce_": _of("all_reduce", "input"),
    "all_reduce_coalesced": _of("all_reduce", "inputs"),
    "all_reduce_coalesced_": _of("all_reduce", "inputs"),
    "all_gather_into_tensor": _of("all_gather", "input"),
    "all_gather_into_tensor_out": _of("all_gather", "input"),
    "all_gather_into_tensor_coalesced": _of("all_gather", "inputs"),
    "reduce_scatter_tensor": _of("reduce_scatter", "input"),
    "reduce_scatter_tensor_out": _of("reduce_scatter", "input"),
    "reduce_scatter_tensor_coalesced": _of("reduce_scatter", "inputs"),
    "all_to_all_single": lambda a, size, rank: [("all_to_all", _sent_rows(
        a["input"], a["input_split_sizes"], size, rank))],
    "broadcast": _of("broadcast", "input"),
    "broadcast_": _of("broadcast", "input"),
    "isend": _of("send", "tensor"),
    "irecv": _of("recv", "tensor"),
    "batch_p2p_ops": _p2p_batch,
}
# Keyed by schema name, so that an op one torch version lacks is simply never met.
_OPS: dict[str, _Payload] = {
    **{f"c10d::{k}": v for k, v in _C10D.items()},
    **{f"_c10d_functional::{k}": v for k, v in _FUNCTIONAL.items()},
    # the autograd variants: when the mode sees one of these it does not see the native op
    # it wraps (a mode is off inside its own handler), and vice versa, so none counts twice
    **{f"_c10d_functional_autograd::{k}": _FUNCTIONAL[k]
       for k in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")},
    "_dtensor::shard_dim_alltoall": lambda a, size, rank: [("all_to_all", _shard_dim_sent(
        a["input"], a["shard_dim"], size, rank))],
}


def _process_group(group: Any) -> dist.ProcessGroup:
    """The ProcessGroup of an op's group argument: a name, a ScriptObject or the group."""
    if isinstance(group, str):
        return dist.distributed_c10d._resolve_process_group(group)
    if isinstance(group, torch.ScriptObject):
        return dist.ProcessGroup.unbox(group)
    return group


# ----------------------------------------------------------------------------- axes
def _label(names: Sequence[str]) -> str:
    """The most specific of the names sharing one group (see the module docstring)."""
    def level(n: str) -> int:
        return 0 if n in AXES else 1 if n in FLATTENED else 2

    best = min(level(n) for n in names)
    return "=".join(n for n in names if level(n) == best)


def _fold_groups(fm: FoldedMesh | None) -> dict[str, tuple[str, ...]]:
    """Group name -> every fold name of that group, in ``AXIS_NAMES`` order."""
    if fm is None:
        return {}
    meshes = [(a, fm.attn[a]) for a in ATTN_AXES] + [(a, fm.moe[a]) for a in MOE_AXES]
    meshes += [(n, fm[n]) for n in FLATTENED] + [("world", fm.world)]
    by_group: dict[str, set[str]] = defaultdict(set)
    for name, mesh in meshes:
        by_group[mesh.get_group().group_name].add(name)
    return {g: tuple(n for n in AXIS_NAMES if n in names) for g, names in by_group.items()}


class CollectiveCounter(TorchDispatchMode):
    """Record every collective issued on this thread (and in its backward) while active.

    Args:
        fm: the folded mesh whose groups name the axes; None records every group as
            ``"default"`` or ``"unknown"``.

    Records accumulate over every ``with`` block of one counter (a forward and a backward in
    separate blocks add up); ``reset()`` clears them. Every rank keeps its own records.
    """

    def __init__(self, fm: FoldedMesh | None = None):
        super().__init__()
        self.fm = fm
        self.records: list[CollectiveRecord] = []
        self._groups = _fold_groups(fm)
        self._labels = {g: _label(names) for g, names in self._groups.items()}
        self._ranks: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ recording
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            # Let DTensor desugar first: the collectives it issues on its local tensors then
            # come back through this mode. Other subclasses run as they are (FakeTensor,
            # inside DTensor's sharding propagation, must not be handed back).
            return NotImplemented
        payload = None
        if isinstance(func, torch._ops.OpOverload):
            payload = _OPS.get(func._schema.name)
        if payload is None:
            return func(*args, **kwargs)
        # trailing arguments with defaults may be omitted: bind what was passed
        bound = dict(zip((a.name for a in func._schema.arguments), args, strict=False))
        bound.update(kwargs)
        pg = _process_group(bound.get("process_group", bound.get("group_name")))
        size, rank = pg.size(), pg.rank()
        backward = torch._C._current_graph_task_id() != -1
        pieces = payload(bound, size, rank)  # before the call: in-place outputs alias inputs
        out = func(*args, **kwargs)
        group = pg.group_name
        axis, aliases = self._axis(pg)
        if group not in self._ranks:
            self._ranks[group] = tuple(dist.get_process_group_ranks(pg))
        for kind, nbytes in pieces:
            self.records.append(CollectiveRecord(
                kind=kind, axis=axis, group_size=size, bytes=int(nbytes),
                direction="backward" if backward else "forward", op=func._schema.name,
                group=group, aliases=aliases, ranks=self._ranks[group]))
        return out

    def _axis(self, pg: dist.ProcessGroup) -> tuple[str, tuple[str, ...]]:
        name = pg.group_name
        if name in self._labels:
            return self._labels[name], self._groups[name]
        default = dist.distributed_c10d._get_default_group()
        if name == default.group_name:
            return "default", ()
        return "unknown", ()

    def reset(self) -> None:
        """Forget every record."""
        self.records = []

    # ------------------------------------------------------------------ queries
    def axis_of(self, name: str) -> str:
        """The ``axis`` label records carry for collectives on ``fm[name]`` (or
        ``fm.world`` for ``"world"``): ``name`` itself unless another, more specific name
        shares its process group (``axis_of("ep_etp") == "ep"`` when etp = 1)."""
        if self.fm is None:
            raise ValueError("axis_of needs the folded mesh: build CollectiveCounter(fm)")
        if name not in AXIS_NAMES:
            raise KeyError(f"no axis named {name!r}; names are {list(AXIS_NAMES)}")
        mesh = self.fm.world if name == "world" else self.fm[name]
        return self._labels[mesh.get_group().group_name]

    def _sum(self, keys: Sequence[str], value: Callable[[CollectiveRecord], int]
             ) -> dict[tuple, int]:
        bad = [k for k in keys if k not in CollectiveRecord.__dataclass_fields__]
        if bad:
            raise KeyError(f"unknown record fields {bad}; fields are "
                           f"{list(CollectiveRecord.__dataclass_fields__)}")
        out: dict[tuple, int] = defaultdict(int)
        for r in self.records:
            out[tuple(getattr(r, k) for k in keys)] += value(r)
        return dict(out)

    def bytes_by(self, keys: Sequence[str] = KEYS) -> dict[tuple, int]:
        """Bytes summed per ``(kind, axis, direction)`` (or per any record fields ``keys``)."""
        return self._sum(keys, lambda r: r.bytes)

    def counts_by(self, keys: Sequence[str] = KEYS) -> dict[tuple, int]:
        """Number of collectives per ``(kind, axis, direction)`` (or per ``keys``)."""
        return self._sum(keys, lambda r: 1)

    def table(self) -> str:
        """The records summed per kind, axis, direction and group size, as aligned text."""
        keys = ("kind", "axis", "direction", "group_size")
        counts, nbytes = self.counts_by(keys), self.bytes_by(keys)
        rows = [("kind", "axis", "direction", "ranks", "count", "bytes")]
        rows += [(*map(str, k), str(counts[k]), f"{nbytes[k]:,}") for k in sorted(counts)]
        rows.append(("total", "", "", "", str(len(self.records)),
                     f"{sum(r.bytes for r in self.records):,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        right = {3, 4, 5}
        return "\n".join(
            "  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows)
