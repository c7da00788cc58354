"""Training and validation batches drawn from a token stream, addressed by step number.

The stream (see ``_sources``) is split once: its last ``data.val_fraction`` is validation,
the rest is training. Global batch ``step`` of a split is ``global_batch`` windows of
``seq_len + 1`` tokens; window ``row`` starts at

    begin + hash64(seed, split, step, row) mod (number of possible starts)

a counter-based draw (B: global_batch, L: seq_len + 1). Hence:

- a data-parallel replica reads only its own rows (``replica_rows``) and only their tokens;
- batch ``step`` is the same for every dp degree, run and restart: resuming needs only the
  step number, and changing the world size keeps the data order;
- windows of a split never reach into the other split.

Batches of these streams are sampled with replacement (uniform starts). Document corpora
("corpus", "prepared") are packed epoch by epoch instead (``foldmesh.data.PackedBatches``),
with the same properties: addressed by step, the same at any dp degree, per-replica rows.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

from ..data import PackedBatches, PackedSequences, TokenDataset, split_documents
from ._sources import ByteStream, MemmapStream, stdlib_stream, text_stream, token_stream
from .config import DataSection

SPLITS = ("train", "val")
_DIGEST_TOKENS = 1 << 14  # tokens hashed from each end of the stream for the fingerprint


def hash64(*values: int) -> int:
    """A stable 64-bit hash of integers (unlike ``hash()``, the same in every process)."""
    packed = struct.pack(f"<{len(values)}q", *values)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little")


def replica_rows(global_batch: int, replica: int, replicas: int) -> range:
    """Rows of every global batch that data-parallel replica ``replica`` of ``replicas`` reads:
    ``[replica * b, (replica + 1) * b)`` with ``b = global_batch // replicas``."""
    if global_batch % replicas:
        raise ValueError(f"training.global_batch = {global_batch} is not divisible by the "
                         f"{replicas} data-parallel replicas (fold.dp): make it a multiple")
    b = global_batch // replicas
    return range(replica * b, (replica + 1) * b)


def _stream_digest(stream: ByteStream | MemmapStream) -> str:
    """Hash of the stream's first and last ``_DIGEST_TOKENS`` tokens: notices changed files of
    the same total length without reading the whole stream."""
    n = len(stream)
    head = stream.read(0, min(n, _DIGEST_TOKENS))
    tail = stream.read(max(0, n - _DIGEST_TOKENS), min(n, _DIGEST_TOKENS))
    return hashlib.blake2b(head.tobytes() + tail.tobytes(), digest_size=8).hexdigest()


class TokenBatches:
    """The global batches of one split of a stream.

    Args:
        stream: the whole token stream (both splits).
        begin, end: this split's token range ``[begin, end)`` of the stream.
        split: "train" or "val" (part of the hash: the two draw different sequences).
        seq_len: tokens per sequence; windows hold ``seq_len + 1`` (inputs and shifted labels).
        global_batch: windows per global batch (B).
        seed: ``training.seed``.

    ``step`` is the next global batch ``next`` returns; ``state_dict`` saves it.
    """

    def __init__(self, stream: ByteStream | MemmapStream, begin: int, end: int, split: str,
                 seq_len: int, global_batch: int, seed: int):
        self.stream, self.begin, self.end = stream, begin, end
        self.split, self.seq_len, self.global_batch, self.seed = split, seq_len, global_batch, seed
        self.step = 0
        self._num_starts = end - begin - seq_len  # starts s with s + seq_len + 1 <= end
        if self._num_starts < 1:
            raise ValueError(f"the {split} split has {end - begin} tokens, fewer than "
                             f"data.seq_len + 1 = {seq_len + 1}: lower data.seq_len, give "
                             "more data (data.path / data.max_bytes) or change "
                             "data.val_fraction")
        self._digest = _stream_digest(stream)

    @property
    def min_vocab(self) -> int:
        """The smallest vocabulary that holds every id of the stream (256 for bytes; for
        token files the first access scans them, see ``MemmapStream.min_vocab``)."""
        return self.stream.min_vocab

    def _rows(self, rows: slice | range | None) -> range:
        every = range(self.global_batch)
        if rows is None:
            return every
        picked = every[rows] if isinstance(rows, slice) else rows
        if len(picked) and (picked.start not in every or picked[-1] not in every):
            raise ValueError(f"rows {rows} lie outside the global batch of "
                             f"{self.global_batch} (training.global_batch)")
        return picked

    def starts(self, step: int, rows: slice | range | None = None) -> torch.Tensor:
        """Stream offsets of the windows ``rows`` (default: all) of batch ``step``: int64
        ``[len(rows)]``, each in ``[begin, end - seq_len - 1]``."""
        split_id = SPLITS.index(self.split)
        offsets = [self.begin + hash64(self.seed, split_id, step, r) % self._num_starts
                   for r in self._rows(rows)]
        return torch.tensor(offsets, dtype=torch.int64)

    def batch(self, step: int, rows: slice | range | None = None) -> torch.Tensor:
        """Windows ``rows`` (default: all B) of global batch ``step``: int64 CPU
        ``[len(rows), seq_len + 1]``; inputs are ``[:, :-1]``, labels ``[:, 1:]``."""
        length = self.seq_len + 1
        starts = self.starts(step, rows).tolist()
        out = np.empty((len(starts), length), dtype=np.int64)
        for i, s in enumerate(starts):
            out[i] = self.stream.read(s, length)
        return torch.from_numpy(out)

    def next(self, rows: slice | range | None = None) -> torch.Tensor:
        """``batch(self.step, rows)``, then advance ``step`` by one."""
        out = self.batch(self.step, rows)
        self.step += 1
        return out

    def fingerprint(self) -> dict:
        """What must match for a saved position to mean the same data (JSON-serialisable)."""
        return {"source": self.stream.name, "length": len(self.stream), "digest": self._digest,
                "split": self.split, "begin": self.begin, "end": self.end, "seed": self.seed}

    def state_dict(self) -> dict:
        return {"step": self.step, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["step"]``; raises ValueError when the data differ from the run
        that saved it (its batches would not continue that run's sequence)."""
        saved, now = state["fingerprint"], self.fingerprint()
        if saved != now:
            changed = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
                                for k in sorted(set(saved) | set(now))
                                if saved.get(k) != now.get(k))
            raise ValueError(f"the {self.split} data changed since the checkpoint ({changed}): "
                             "restore the run's data.* and training.seed settings and files, "
                             "or start a new run (another checkpoint.dir or "
                             "checkpoint.resume = false)")
        self.step = int(state["step"])


Batches = TokenBatches | PackedBatches


def read_rows(data: Batches, step: int, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows`` of global batch ``step``: token ids and labels, int64 ``[len(rows), S]``
    each (labels are the next tokens; ``IGNORE_INDEX`` where a packed sequence is padded)."""
    if isinstance(data, PackedBatches):
        b = data.batch(step, rows)
        return b.inputs, b.labels
    windows = data.batch(step, rows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def num_targets(data: Batches, step: int) -> int:
    """Labels that count in the loss over all rows of global batch ``step`` (no tokens read):
    the loss of a step is the sum over its tokens divided by this, at any dp degree."""
    if isinstance(data, PackedBatches):
        return data.num_targets(step)
    return data.global_batch * data.seq_len


def _document_data(cfg: DataSection, global_batch: int, seed: int, token_dir
                   ) -> tuple[Batches, Batches]:
    """A prepared token directory: packed epochs of its documents (train and val documents
    split once, by seed), or windows with replacement from its stream."""
    ds = TokenDataset(token_dir)
    if cfg.sampling == "replacement":
        n = len(ds)
        cut = n - int(n * cfg.val_fraction)
        return (TokenBatches(ds, 0, cut, "train", cfg.seq_len, global_batch, seed),
                TokenBatches(ds, cut, n, "val", cfg.seq_len, global_batch, seed))
    train_docs, val_docs = split_documents(ds.num_documents, cfg.val_fraction, seed)
    train = PackedBatches(PackedSequences(ds, cfg.seq_len, seed, documents=train_docs),
                          global_batch, "train")
    val = PackedBatches(PackedSequences(ds, cfg.seq_len, seed, documents=val_docs),
                        global_batch, "val")
    return train, val


def build_data(cfg: DataSection, global_batch: int, seed: int, token_dir=None
               ) -> tuple[Batches, Batches]:
    """The (train, val) batches of ``cfg``'s source. Streams share one stream split by
    ``val_fraction`` of its tokens; document sources ("corpus", "prepared") read the token
    directory ``token_dir`` (``foldmesh.train._corpus.token_dir``)."""
    if cfg.seq_len < 1:
        raise ValueError(f"data.seq_len = {cfg.seq_len} must be at least 1")
    if global_batch < 1:
        raise ValueError(f"training.global_batch = {global_batch} must be at least 1")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"data.val_fraction = {cfg.val_fraction} must lie strictly between "
                         "0 and 1")
    if cfg.source != "tokens" and cfg.max_bytes < 1:
        raise ValueError(f"data.max_bytes = {cfg.max_bytes} must be positive")
    if cfg.source in ("corpus", "prepared"):
        return _document_data(cfg, global_batch, seed, token_dir or cfg.path)
    if cfg.source == "stdlib":
        stream = stdlib_stream(cfg.max_bytes)
    elif cfg.source == "text":
        stream = text_stream(cfg.path, cfg.max_bytes)
    elif cfg.source == "tokens":
        stream = token_stream(cfg.path, cfg.dtype)
    else:
        raise ValueError(f'data.source = {cfg.source!r}: use "stdlib", "text" or "tokens"')
    n = len(stream)
    cut = n - int(n * cfg.val_fraction)
    train = TokenBatches(stream, 0, cut, "train", cfg.seq_len, global_batch, seed)
    val = TokenBatches(stream, cut, n, "val", cfg.seq_len, global_batch, seed)
    return train, val
