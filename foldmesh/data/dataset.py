"""``TokenDataset``: a prepared token directory, memory-mapped read-only.

The documents of all shards, in shard order, are documents ``0 .. num_documents - 1``; their
tokens, back to back, are the global token stream ``0 .. num_tokens - 1`` (every document
ends with EOS). Only the pages a read touches are loaded, so a corpus of any size opens in
milliseconds; the document index (8 bytes per document) is read once, on first use.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from .format import INDEX_DTYPE, TOKEN_DTYPES, check_input, check_shard_files, verify


class TokenDataset:
    """The prepared directory ``path`` (``python -m foldmesh.data.prepare --out path``).

    Opening checks every shard's size and counts against the manifest (``verify`` without
    input or checksum checks) and raises ``DataError`` naming the file that fails;
    ``check_inputs=True`` also refuses input files changed since they were tokenized.

    Attributes:
        path: the directory.
        manifest: its ``MANIFEST.json`` (dict).
        dtype: ``"uint16"`` or ``"uint32"``, the ids' type on disk.
        vocab_size, eos_id: the tokenizer's (ids lie in ``[0, vocab_size)``).
        num_documents, num_tokens: totals (EOS tokens included).
        name: ``"prepared:<path>"``, for messages (and ``TokenBatches``' fingerprint).
    """

    def __init__(self, path: str | Path, check_inputs: bool = False):
        self.path = Path(path)
        self.manifest = verify(self.path, check_inputs=check_inputs)
        m = self.manifest
        self.dtype, self.vocab_size, self.eos_id = m["dtype"], m["vocab_size"], m["eos_id"]
        self.num_documents, self.num_tokens = m["num_documents"], m["num_tokens"]
        self.name = f"prepared:{self.path.resolve()}"
        shards = [s for s in m["shards"] if s["tokens"]]  # an empty file cannot be mapped
        self._shards = shards
        self._tokens = [np.memmap(self.path / s["files"]["tokens"]["name"],
                                  dtype=TOKEN_DTYPES[self.dtype], mode="r") for s in shards]
        # Exclusive end of each non-empty shard in the global stream.
        self._token_ends = np.cumsum([s["tokens"] for s in shards], dtype=np.int64)

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def min_vocab(self) -> int:
        """``vocab_size``: what ``foldmesh.train.data.TokenBatches`` asks a stream for."""
        return self.vocab_size

    @functools.cached_property
    def document_ends(self) -> np.ndarray:
        """Exclusive end of every document in the global stream: int64 ``[num_documents]``,
        increasing; the last is ``num_tokens``. Read from the index files on first use."""
        ends = np.empty(self.num_documents, dtype=np.int64)
        filled, offset = 0, 0
        for s in self._shards:
            index = np.fromfile(self.path / s["files"]["index"]["name"], dtype=INDEX_DTYPE)
            ends[filled:filled + len(index)] = index + offset
            filled, offset = filled + len(index), offset + s["tokens"]
        return ends

    @functools.cached_property
    def document_lengths(self) -> np.ndarray:
        """Tokens of every document, EOS included: int64 ``[num_documents]``, each >= 1."""
        return np.diff(self.document_ends, prepend=0)

    def document_span(self, i: int) -> tuple[int, int]:
        """``[start, end)`` of document ``i`` in the global stream."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} of {self.num_documents}")
        ends = self.document_ends
        return (int(ends[i - 1]) if i else 0), int(ends[i])

    def document(self, i: int) -> np.ndarray:
        """The tokens of document ``i``, its EOS last: a read-only ``dtype`` view
        ``[length]`` of the memory map (no copy)."""
        start, end = self.document_span(i)
        return self.tokens(start, end)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Global tokens ``[start, stop)`` as ``dtype``: a read-only view when they lie in
        one shard, else a copy joining the shards' pieces."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) of a stream of {self.num_tokens}")
        s = int(np.searchsorted(self._token_ends, start, side="right"))
        if start == stop:
            return np.empty(0, dtype=TOKEN_DTYPES[self.dtype])
        begin = int(self._token_ends[s - 1]) if s else 0
        if stop <= self._token_ends[s]:
            return self._tokens[s][start - begin:stop - begin]
        pieces = []
        while start < stop:
            begin = int(self._token_ends[s - 1]) if s else 0
            piece = self._tokens[s][start - begin:stop - begin]
            pieces.append(piece)
            start += len(piece)
            s += 1
        return np.concatenate(pieces)

    def __getitem__(self, key: slice) -> np.ndarray:
        """``ds[a:b]``: ``tokens(a, b)`` with Python slice bounds (step 1 only)."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenDataset supports ds[start:stop] only; use document(i) for "
                            "a document")
        start, stop, _ = key.indices(self.num_tokens)
        return self.tokens(start, max(start, stop))

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64 (the trainer's stream interface, so
        ``TokenBatches`` can sample windows with replacement from a prepared directory)."""
        return self.tokens(start, start + length).astype(np.int64)

    @functools.cached_property
    def identity(self) -> str:
        """A digest of the tokens' identity: every shard's sha256 and counts, dtype, vocab and
        EOS. Unchanged when prepare reruns on touched but equal inputs."""
        parts = [self.dtype, self.vocab_size, self.eos_id,
                 [(s["files"]["tokens"]["sha256"], s["files"]["index"]["sha256"])
                  for s in self.manifest["shards"]]]
        return hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).hexdigest()

    def verify(self, check_inputs: bool = True, checksums: bool = False) -> None:
        """``foldmesh.data.verify`` of this directory, against the manifest read at open."""
        for shard in self.manifest["shards"]:
            check_shard_files(self.path, shard, self.dtype, checksums)
            if check_inputs:
                check_input(self.path, shard)

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.path)!r}, documents={self.num_documents}, "
                f"tokens={self.num_tokens}, dtype={self.dtype}, vocab_size={self.vocab_size})")

