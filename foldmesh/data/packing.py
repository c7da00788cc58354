"""Packed training sequences: epochs of shuffled documents, sampled without replacement.

Legend: S ``seq_len``, B ``global_batch``, n documents of lengths ``L_i`` (EOS included),
N = sum(L_i) tokens per epoch, W windows per epoch.

**An epoch.** Epoch ``e`` orders the documents by a permutation drawn from
``numpy.random.default_rng(SeedSequence([seed, e]))`` (the same on every machine for one
numpy version; numpy does not promise it across versions) and joins them after one leading
EOS::

    stream_e = [EOS] + doc(order_e[0]) + doc(order_e[1]) + ...        (N + 1 tokens)

Window ``w`` (``0 <= w < W = ceil(N / S)``) is ``stream_e[w*S : w*S + S + 1]``: inputs are its
first S tokens, labels its last S. Consecutive windows overlap by one token (the last label of
one is the first input of the next), so the labels of an epoch are exactly ``stream_e[1:]``:
every token of every document, its EOS included, is a target exactly once per epoch. The
leading EOS stands for the EOS before the first document, so every document, the first too,
is predicted from an EOS. The last window's missing positions are padded: input ``pad_id``
(default EOS), label ``IGNORE_INDEX`` (-100, which ``foldmesh.cross_entropy`` skips),
document id -1. The next epoch starts a new stream, in a new order.

**Addressing.** Global window ``g = e * W + w``; row ``r`` of global batch ``step`` is
``g = step * B + r`` (after a resume, counted from the resumed position). A batch is the same
at every data-parallel degree, a replica reads only its rows, and a batch may end one epoch
and begin the next.

**Document ids.** ``document_ids[p]`` is the dataset index of the document label ``p``
belongs to. A document's positions are then the EOS before it (its BOS) and its own tokens
but its final EOS: a mask letting position ``p`` attend to ``q <= p`` only where the ids are
equal runs every document as if it were alone in its window. Only the ids are provided: the
models do not apply such a mask (attention is causal over the whole window).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import torch

from ..loss import IGNORE_INDEX
from ._errors import DataError
from .dataset import TokenDataset

_EPOCHS_CACHED = 2  # a batch spans at most two epochs when W >= B
_SPLIT_STREAM = 0x53504C4954  # "SPLIT": no run reaches this epoch


class PackedBatch(NamedTuple):
    """Rows of one global batch: each int64 CPU ``[rows, S]``."""

    inputs: torch.Tensor
    labels: torch.Tensor
    """``IGNORE_INDEX`` where the window is padded."""
    document_ids: torch.Tensor
    """The dataset index of each label's document; -1 where padded."""


def split_documents(num_documents: int, val_fraction: float, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Document indices of a (train, val) split: int64, sorted, disjoint, together every
    document. ``round(num_documents * val_fraction)`` (at least one when ``val_fraction``
    > 0) random documents are held out, drawn with ``seed``."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"data.val_fraction = {val_fraction} must lie in [0, 1)")
    n_val = round(num_documents * val_fraction)
    n_val = max(n_val, 1) if val_fraction > 0 else 0
    if n_val >= num_documents:
        raise DataError(f"data.val_fraction = {val_fraction} of {num_documents} documents "
                        "leaves none for training: lower data.val_fraction or give more "
                        "documents")
    # The second word keeps this draw apart from every epoch's ([seed, epoch]).
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM]))
    perm = rng.permutation(num_documents)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


class PackedSequences:
    """Epochs of the documents ``documents`` of ``dataset`` packed into ``seq_len + 1``-token
    windows (see the module docstring).

    Args:
        dataset: a prepared ``TokenDataset``.
        seq_len: S, tokens per sequence.
        seed: seeds every epoch's order (with the epoch number); a non-negative int.
        documents: dataset indices of the documents to use (default: all), e.g. one side of
            ``split_documents``.
        pad_id: the input id of padded positions (default the dataset's EOS).

    Holds the order and cumulative lengths of the last ``_EPOCHS_CACHED`` epochs: 16 bytes
    per document each.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, seed: int,
                 documents: np.ndarray | None = None, pad_id: int | None = None):
        if seq_len < 1:
            raise DataError(f"data.seq_len = {seq_len} must be at least 1")
        if seed < 0:
            raise DataError(f"training.seed = {seed} must be non-negative")
        self.dataset, self.seq_len, self.seed = dataset, seq_len, seed
        self.pad_id = dataset.eos_id if pad_id is None else pad_id
        every = np.arange(dataset.num_documents, dtype=np.int64)
        self.documents = every if documents is None else np.asarray(documents, dtype=np.int64)
        if not len(self.documents):
            raise DataError(f"no documents of {dataset.path} to pack: give a non-empty "
                            "document set (data.val_fraction leaves none?)")
        self._lengths = dataset.document_lengths[self.documents]
        self.num_targets = int(self._lengths.sum())  # N: labels per epoch
        self.num_windows = -(-self.num_targets // seq_len)  # W = ceil(N / S)
        self._ends = dataset.document_ends
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def order(self, epoch: int) -> np.ndarray:
        """The dataset indices of the documents in epoch ``epoch``'s order: int64 ``[n]``."""
        return self._epoch(epoch)[0]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, exclusive end of each ordered document in ``stream_e[1:]``)."""
        if epoch not in self._cache:
            if epoch < 0:
                raise IndexError(f"epoch {epoch} < 0")
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            perm = rng.permutation(len(self.documents))
            if len(self._cache) >= _EPOCHS_CACHED:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = self.documents[perm], np.cumsum(self._lengths[perm])
        return self._cache[epoch]

    def window(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Window ``index`` of epoch ``epoch``: (inputs, labels, document ids), each int64
        ``[S]``; see the module docstring for padding and ids."""
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} of an epoch of {self.num_windows}")
        order, ends = self._epoch(epoch)
        S = self.seq_len
        # stream_e[q] is ordered-document token q - 1 (q >= 1): the window's S + 1 tokens are
        # those [c0 - 1, c0 + S) of the ordered documents, below the leading EOS when c0 = 0.
        c0 = index * S
        lo, hi = max(c0 - 1, 0), min(c0 + S, self.num_targets)
        tokens = np.empty(hi - lo, dtype=np.int64)
        owners = np.empty(hi - lo, dtype=np.int64)
        k = int(np.searchsorted(ends, lo, side="right"))  # ordered document holding token lo
        pos = lo
        while pos < hi:
            doc_begin = int(ends[k - 1]) if k else 0
            stop = min(hi, int(ends[k]))
            d = int(order[k])
            first = int(self._ends[d - 1]) if d else 0  # document d in the dataset's stream
            piece = self.dataset.tokens(first + pos - doc_begin, first + stop - doc_begin)
            tokens[pos - lo:stop - lo] = piece
            owners[pos - lo:stop - lo] = d
            pos, k = stop, k + 1
        if c0 == 0:
            tokens = np.concatenate(([self.dataset.eos_id], tokens))
            owners = np.concatenate(([order[0]], owners))
        n = len(tokens) - 1  # real (input, label) pairs: S except in the last window
        inputs = np.full(S, self.pad_id, dtype=np.int64)
        labels = np.full(S, IGNORE_INDEX, dtype=np.int64)
        doc_ids = np.full(S, -1, dtype=np.int64)
        inputs[:n], labels[:n], doc_ids[:n] = tokens[:-1], tokens[1:], owners[1:]
        return inputs, labels, doc_ids

    def fingerprint(self) -> dict:
        """What must match for a saved position to mean the same windows (JSON-serialisable):
        the tokens' identity (not the directory's path), the document set, S and the seed."""
        docs = hashlib.blake2b(self.documents.tobytes(), digest_size=8).hexdigest()
        return {"tokens": self.dataset.identity, "documents": docs,
                "num_documents": len(self.documents), "seq_len": self.seq_len,
                "seed": self.seed, "pad_id": self.pad_id}


class PackedBatches:
    """Global batches of ``global_batch`` windows of ``packed``, addressed by step.

    ``step`` is the next batch ``next`` returns. ``state_dict`` saves it with the epoch and
    window where it starts; ``load_state_dict`` continues there exactly, even under another
    ``global_batch`` (the windows are counted, not the steps).
    """

    def __init__(self, packed: PackedSequences, global_batch: int, split: str = "train"):
        if global_batch < 1:
            raise DataError(f"training.global_batch = {global_batch} must be at least 1")
        if packed.num_windows < global_batch:
            raise DataError(
                f"the {split} data ({len(packed.documents)} documents, {packed.num_targets} "
                f"tokens of {packed.dataset.path}) make {packed.num_windows} sequences of "
                f"data.seq_len = {packed.seq_len} per epoch, fewer than one global batch of "
                f"training.global_batch = {global_batch}: give more data, or lower "
                "data.seq_len or training.global_batch")
        self.packed, self.global_batch, self.split = packed, global_batch, split
        self.step = 0
        self._base_step, self._base = 0, 0  # window _base is row 0 of batch _base_step

    def locate(self, step: int, row: int) -> tuple[int, int]:
        """(epoch, window) of row ``row`` of global batch ``step``."""
        if not 0 <= row < self.global_batch:
            raise IndexError(f"row {row} of a global batch of {self.global_batch} "
                             "(training.global_batch)")
        g = self._base + (step - self._base_step) * self.global_batch + row
        if g < 0:
            raise IndexError(f"step {step} lies before the start of the data")
        return divmod(g, self.packed.num_windows)

    def batch(self, step: int, rows: slice | range | None = None) -> PackedBatch:
        """Rows ``rows`` (default all B; a replica passes its own) of global batch
        ``step``: a ``PackedBatch`` of int64 CPU ``[len(rows), S]`` tensors."""
        every = range(self.global_batch)
        picked = every if rows is None else every[rows] if isinstance(rows, slice) else rows
        out = np.empty((3, len(picked), self.packed.seq_len), dtype=np.int64)
        for i, r in enumerate(picked):
            out[:, i] = self.packed.window(*self.locate(step, r))
        return PackedBatch(*(torch.from_numpy(a) for a in out))

    def num_targets(self, step: int) -> int:
        """Labels that are not ``IGNORE_INDEX`` in all rows of global batch ``step``, from the
        window numbers alone (no tokens read). A loss summed over a replica's rows and divided
        by this is the global batch's token mean at any dp degree, padding or not."""
        g = self._base + (step - self._base_step) * self.global_batch
        windows = np.arange(g, g + self.global_batch) % self.packed.num_windows
        S, N = self.packed.seq_len, self.packed.num_targets
        return int(np.minimum(S, N - windows * S).sum())

    def next(self, rows: slice | range | None = None) -> PackedBatch:
        """``batch(self.step, rows)``, then advance ``step`` by one."""
        out = self.batch(self.step, rows)
        self.step += 1
        return out

    @property
    def epoch(self) -> int:
        """The epoch of the next batch's first row."""
        return self.locate(self.step, 0)[0]

    def state_dict(self) -> dict:
        epoch, position = self.locate(self.step, 0)
        return {"step": self.step, "epoch": epoch, "position": position,
                "fingerprint": {**self.packed.fingerprint(), "split": self.split}}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``'s step, epoch and window; raises ``DataError`` when the data
        differ from those of the run that saved it."""
        saved = state["fingerprint"]
        now = {**self.packed.fingerprint(), "split": self.split}
        if saved != now:
            changed = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
                                for k in sorted(set(saved) | set(now))
                                if saved.get(k) != now.get(k))
            raise DataError(f"the {self.split} data changed since the checkpoint ({changed}): "
                            "restore the run's data.* and training.seed settings and "
                            "prepared directory, or start a new run (another checkpoint.dir "
                            "or checkpoint.resume = false)")
        self.step = self._base_step = int(state["step"])
        self._base = int(state["epoch"]) * self.packed.num_windows + int(state["position"])
