"""Which tokens each rank holds: batch over dp, load-balanced sequence chunks over cp.

Dimension legend: B global batch, S global sequence, b = B/dp, C = S/(2·cp) chunk length.

With causal attention a token attends to every earlier token, so the last positions of a
sequence cost the most. Context parallelism therefore cuts the sequence into 2·cp chunks and
gives cp rank r chunks r and 2·cp-1-r: every rank then does the same attention work (the
scheme Megatron-Core and TorchTitan use). With cp = 1 a rank holds the whole sequence.

The attention view's activations are DTensors whose sequence dim is in this *load-balanced
order*: chunks (0, 2cp-1, 1, 2cp-2, ...), so that ``Shard(1)`` over cp hands rank r its two
chunks. ``sequence_order`` gives that order; token-wise results (the loss) do not depend on
it, and ``natural_order`` undoes it on a gathered tensor.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from ._fold import FoldError
from ._mesh import FoldedMesh

TOKENS = (Shard(0), Shard(1), Replicate())
"""Placements of token ids and labels ``[B, S]`` on ``fm.attn_stage``."""


def check_sequence(batch: int, seq: int, fm: FoldedMesh) -> None:
    """Raise ``FoldError`` unless a ``[batch, seq]`` global batch splits as the fold needs."""
    f = fm.fold
    if batch % f.dp:
        raise FoldError(
            f"batch size {batch} is not divisible by dp = {f.dp}: every data-parallel replica "
            f"needs the same number of sequences; use a multiple of {f.dp}"
        )
    split = 2 * f.cp if f.cp > 1 else 1
    if seq % split or (seq // f.cp) % f.tp:
        need = split * f.tp if f.cp > 1 else f.tp
        why = f"2·cp = {split} load-balanced chunks, " if f.cp > 1 else ""
        raise FoldError(
            f"sequence length {seq} does not split into {why}each divisible over tp = {f.tp} "
            f"(cp = {f.cp}); use a sequence length that is a multiple of {need}"
        )


def sequence_order(seq: int, cp: int) -> torch.Tensor:
    """[S] int64: global position of each index of the load-balanced sequence order."""
    if cp == 1:
        return torch.arange(seq)
    chunks = torch.arange(seq).view(2 * cp, seq // (2 * cp))
    order = [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]
    return chunks[order].reshape(-1)


def natural_order(x: torch.Tensor, cp: int, dim: int = 1) -> torch.Tensor:
    """Undo the load-balanced order along ``dim`` of a gathered (plain) tensor."""
    inverse = torch.argsort(sequence_order(x.shape[dim], cp)).to(x.device)
    return x.index_select(dim, inverse)


def local_positions(seq: int, fm: FoldedMesh, device=None) -> torch.Tensor:
    """[S/cp] int64: the global positions of this rank's tokens (its cp rank's chunks)."""
    cp = fm.fold.cp
    n = seq // cp
    r = fm.coordinate("cp")
    return sequence_order(seq, cp)[r * n:(r + 1) * n].to(device)


def _dp_rows(t: torch.Tensor, fm: FoldedMesh) -> torch.Tensor:
    """This rank's data-parallel replica's sequences of a global ``[B, S, ...]`` tensor."""
    check_sequence(t.shape[0], t.shape[1], fm)
    b = t.shape[0] // fm.fold.dp
    d = fm.coordinate("dp")
    return t[d * b:(d + 1) * b]


def _cp_chunks(rows: torch.Tensor, fm: FoldedMesh) -> torch.Tensor:
    """This cp rank's load-balanced chunks of a replica's ``[b, S, ...]`` rows."""
    if fm.fold.cp == 1:
        return rows
    return rows.index_select(1, local_positions(rows.shape[1], fm, rows.device))


def shard_tokens(t: torch.Tensor, fm: FoldedMesh) -> torch.Tensor:
    """This rank's ``[b, S/cp, ...]`` block of a global ``[B, S, ...]`` tensor (the same on
    every rank): its dp rank's sequences, its cp rank's load-balanced chunks."""
    return _cp_chunks(_dp_rows(t, fm), fm)


def distribute_tokens(t: torch.Tensor, fm: FoldedMesh) -> DTensor:
    """A global ``[B, S]`` tensor (token ids or labels, the same on every rank) as a DTensor
    on ``fm.attn_stage`` with ``TOKENS`` placements, sequence in load-balanced order."""
    return replica_tokens(_dp_rows(t, fm), fm)


def local_tokens(t: torch.Tensor, fm: FoldedMesh) -> torch.Tensor:
    """This rank's block of token ids or labels given globally (plain tensor) or already
    sharded (a DTensor from ``distribute_tokens``)."""
    if isinstance(t, DTensor):
        if t.device_mesh != fm.attn_stage or tuple(t.placements) != TOKENS:
            raise FoldError(
                f"sharded token ids must be a DTensor on fm.attn_stage with {TOKENS} (see "
                f"foldmesh.distribute_tokens), got {t.device_mesh} with {t.placements}"
            )
        check_sequence(t.shape[0], t.shape[1], fm)
        return t.to_local()
    return shard_tokens(t, fm)


def replica_tokens(rows: torch.Tensor, fm: FoldedMesh) -> DTensor:
    """This data-parallel replica's own ``[b, S]`` rows (token ids or labels) as the global
    ``[dp·b, S]`` DTensor on ``fm.attn_stage`` with ``TOKENS`` placements: each replica reads
    only its rows; the cp ranks keep their load-balanced chunks."""
    check_sequence(rows.shape[0] * fm.fold.dp, rows.shape[1], fm)
    shape = torch.Size((rows.shape[0] * fm.fold.dp, rows.shape[1]))
    return DTensor.from_local(_cp_chunks(rows, fm).contiguous(), fm.attn_stage, TOKENS,
                              run_check=False, shape=shape, stride=(shape[1], 1))
