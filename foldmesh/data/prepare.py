"""Tokenize a corpus once into a prepared token directory (layout: ``foldmesh.data.format``).

    python -m foldmesh.data.prepare --tokenizer TOKENIZER --input FILES... --out DIR \\
        [--text-field text] [--workers N] [--eos TOKEN] [--no-progress]

``TOKENIZER`` is a ``tokenizer.json``, a directory holding one, or ``bytes``; ``FILES`` are
text, JSON Lines or Parquet files or directories of them (``foldmesh.data.sources``).

- **Every core**: the main process reads documents and writes shards; ``--workers``
  processes (default: every core this process may use) tokenize batches of documents. Batches
  come back in submission order, so the output bytes do not depend on the worker count.
  ``--workers 1`` tokenizes in the main process, where the tokenizers library may use its
  own threads (``TOKENIZERS_PARALLELISM=false`` stops it).
- **Resumable**: input file ``i`` becomes shard ``i``, written as ``*.tmp`` files and renamed
  into place, its record ``{i:05d}.json`` last. A rerun keeps every shard whose record matches
  the input's path, size and mtime, the tokenizer and the dtype, and redoes the rest.
- **Verifiable**: ``MANIFEST.json`` is removed when a run starts and written last,
  atomically; ``foldmesh.data.verify`` and ``TokenDataset`` check the files against it.

Two runs must not write one ``--out`` at the same time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ._errors import DataError
from .format import (
    FORMAT,
    INDEX_DTYPE,
    MANIFEST,
    SHARD_RE,
    TOKEN_DTYPES,
    VERSION,
    check_shard_files,
    input_record,
    shard_stem,
    write_json_atomic,
)
from .sources import empty_corpus, expand_inputs, file_format, read_documents
from .tokenizer import Tokenizer, load_tokenizer, token_dtype

# A task is a batch of documents of one file: this many characters or documents, whichever
# comes first. Large enough to amortise the pickling, small enough to balance the workers.
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 4096
_IN_FLIGHT_PER_WORKER = 2  # tasks queued per worker: bounds memory, keeps workers busy


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def encode_documents(tokenizer: Tokenizer, texts: list[str], dtype: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The documents' ids back to back, EOS after each: (``dtype`` ``[sum(lengths)]``,
    int64 lengths ``[len(texts)]``, EOS included)."""
    ids = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    eos = (tokenizer.eos_id,)
    if ids and isinstance(ids[0], np.ndarray):  # bytes: join the arrays
        flat = np.concatenate([p for x in ids for p in (x, eos)]).astype(TOKEN_DTYPES[dtype])
    else:  # lists of ints: one pass in C (a slice assignment per document is 5x slower)
        flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, eos) for x in ids),
                           dtype=TOKEN_DTYPES[dtype], count=int(lengths.sum()))
    return flat, lengths


# --------------------------------------------------------------------------- worker side
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(task: tuple[list[str], str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_documents(_worker_tokenizer, *task)


@contextlib.contextmanager
def _pool(workers: int, tokenizer: Tokenizer):
    """``workers`` processes holding ``tokenizer``: forked where the OS can (a spawned one
    would import torch again, seconds each), each tokenizing on one thread."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    # The tokenizers library reads TOKENIZERS_PARALLELISM at fork time: set, it neither
    # warns about a fork after its own threads ran nor starts threads in the workers, which
    # would oversubscribe the cores the workers already use.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with warnings.catch_warnings():
            # Python >= 3.12 warns about forking a process with threads (the tokenizers
            # library's, torch's). The workers run no threaded code, as torch's own
            # DataLoader workers, forked the same way, do not.
            warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        yield pool


def _ordered_results(tasks: Iterator, tokenizer: Tokenizer, dtype: str, workers: int):
    """Yield ``(meta, encode_documents(texts))`` for ``(meta, texts)`` of ``tasks``, in order,
    at most ``_IN_FLIGHT_PER_WORKER * workers`` tasks ahead of the consumer."""
    if workers == 1:
        for meta, texts in tasks:
            yield meta, encode_documents(tokenizer, texts, dtype)
        return
    with _pool(workers, tokenizer) as pool:
        pending: deque = deque()
        for meta, texts in tasks:
            pending.append((meta, pool.apply_async(_encode_in_worker, ((texts, dtype),))))
            if len(pending) >= _IN_FLIGHT_PER_WORKER * workers:
                meta, result = pending.popleft()
                yield meta, result.get()
        while pending:
            meta, result = pending.popleft()
            yield meta, result.get()


# --------------------------------------------------------------------------- main side
def _tasks(files: list[Path], todo: list[int], text_field: str) -> Iterator:
    """``((shard, input bytes done since the last task, last task of the shard), texts)``
    for the documents of every file in ``todo``; each file ends with a last task, empty if
    need be, so that every shard is committed."""
    for i in todo:
        texts, chars, reported = [], 0, 0
        for text, done in read_documents(files[i], text_field):
            texts.append(text)
            chars += len(text)
            if chars >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
                yield (i, done - reported, False), texts
                texts, chars, reported = [], 0, done
        yield (i, files[i].stat().st_size - reported, True), texts


class _ShardWriter:
    """Shard ``index``'s token and index files, written as ``*.tmp`` and hashed on the way."""

    def __init__(self, out: Path, index: int, dtype: str):
        self.out, self.stem, self.dtype = out, shard_stem(index), dtype
        self.tokens = self.documents = 0
        self._files = {kind: open(out / f"{self.stem}.{kind}.tmp", "wb") for kind in
                       ("bin", "idx")}
        self._hashes = {kind: hashlib.sha256() for kind in self._files}

    def _put(self, kind: str, data: bytes) -> None:
        self._files[kind].write(data)
        self._hashes[kind].update(data)

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        ends = np.cumsum(lengths) + self.tokens
        self._put("bin", tokens.tobytes())
        self._put("idx", ends.astype(INDEX_DTYPE).tobytes())
        self.tokens += len(tokens)
        self.documents += len(lengths)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def commit(self, header: dict) -> dict:
        """Rename the files into place, the record last; return the record."""
        files = {}
        for kind, name in (("bin", "tokens"), ("idx", "index")):
            f = self._files[kind]
            f.flush()
            os.fsync(f.fileno())
            f.close()
            final = self.out / f"{self.stem}.{kind}"
            os.replace(self.out / f"{self.stem}.{kind}.tmp", final)
            files[name] = {"name": final.name, "size": final.stat().st_size,
                           "sha256": self._hashes[kind].hexdigest()}
        record = {**header, "tokens": self.tokens, "documents": self.documents, "files": files}
        write_json_atomic(self.out / f"{self.stem}.json", record)
        return record


def _reusable(out: Path, index: int, header: dict) -> dict | None:
    """Shard ``index``'s record when it is complete and made from the same input, tokenizer
    and dtype as ``header``; else None."""
    try:
        record = json.loads((out / f"{shard_stem(index)}.json").read_text(encoding="utf-8"))
        if any(record.get(k) != v for k, v in header.items()):
            return None
        check_shard_files(out, record, header["dtype"])
    except (OSError, ValueError, KeyError, TypeError):  # DataError is a ValueError
        return None
    return record


def _clean(out: Path, num_inputs: int) -> None:
    """Remove the manifest, left-over ``*.tmp`` files and shards past the last input, so that
    the directory ends up holding exactly what the new manifest lists."""
    (out / MANIFEST).unlink(missing_ok=True)
    (out / f"{MANIFEST}.tmp").unlink(missing_ok=True)
    for f in out.iterdir():
        m = SHARD_RE.match(f.name)
        if m and (m.group(3) or int(m.group(1)) >= num_inputs):
            f.unlink()


def prepare(tokenizer: str | Path | Tokenizer, inputs: Sequence[str | Path], out: str | Path,
            *, text_field: str = "text", workers: int | None = None, eos: str | None = None,
            progress: bool = True) -> dict:
    """Tokenize the documents of ``inputs`` into the directory ``out``; return its manifest.

    Args:
        tokenizer: ``"bytes"``, a ``tokenizer.json``, its directory, or a loaded ``Tokenizer``.
        inputs: files or directories (see ``foldmesh.data.sources.expand_inputs``).
        out: the output directory, created if missing; a rerun resumes in it.
        text_field: the JSON Lines field / Parquet column holding the text.
        workers: tokenizing processes (default ``default_workers()``); 1 tokenizes in this
            process. The output does not depend on it.
        eos: the EOS token's text, overriding the tokenizer's (see ``load_tokenizer``).
        progress: show a tqdm bar over the input bytes.

    Raises ``DataError`` naming the file and setting for bad input, before anything is
    written when it can be known up front (missing, unreadable or Parquet-without-pyarrow
    inputs, a bad tokenizer).
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer, eos)
    files = expand_inputs(inputs)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise DataError(f"--workers = {workers} must be at least 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file: give a directory")
    out.mkdir(parents=True, exist_ok=True)
    _clean(out, len(files))
    dtype = token_dtype(tok.vocab_size)
    headers = [{"input": input_record(f, file_format(f), text_field),
                "tokenizer": tok.identity(), "dtype": dtype} for f in files]
    records: list[dict | None] = [_reusable(out, i, h) for i, h in enumerate(headers)]
    todo = [i for i, r in enumerate(records) if r is None]
    for i in todo:  # a stale record must not vouch for the files about to be rewritten
        (out / f"{shard_stem(i)}.json").unlink(missing_ok=True)

    total = sum(headers[i]["input"]["size"] for i in todo)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
               desc=f"tokenizing {len(todo)}/{len(files)} files", dynamic_ncols=True)
    writer: _ShardWriter | None = None
    tokens = 0
    try:
        results = _ordered_results(_tasks(files, todo, text_field), tok, dtype,
                                   workers if todo else 1)
        for (i, done, last), (flat, lengths) in results:
            if writer is None:
                writer = _ShardWriter(out, i, dtype)
            writer.write(flat, lengths)
            tokens += len(flat)
            bar.update(done)
            bar.set_postfix(tokens=tokens, refresh=False)
            if last:
                records[i] = writer.commit(headers[i])
                writer = None
    finally:
        if writer is not None:
            writer.close()
        bar.close()

    shards = [{k: v for k, v in r.items() if k not in ("tokenizer", "dtype")} for r in records]
    num_documents = sum(s["documents"] for s in shards)
    if not num_documents:
        raise empty_corpus(files)
    manifest = {"format": FORMAT, "version": VERSION,
                "tokenizer": {"name": tok.name, **tok.identity()},
                "dtype": dtype, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                "text_field": text_field, "num_documents": num_documents,
                "num_tokens": sum(s["tokens"] for s in shards),
                "shards": shards}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m foldmesh.data.prepare",
        description="Tokenize text, JSON Lines or Parquet files once into memory-mapped "
                    "token shards with a document index and a manifest.")
    parser.add_argument("--tokenizer", required=True,
                        help='a tokenizer.json, a directory holding one, or "bytes"')
    parser.add_argument("--input", required=True, nargs="+", metavar="FILE",
                        help="text (one document per file), *.jsonl or *.parquet files, or "
                             "directories of them")
    parser.add_argument("--out", required=True, help="output directory (a rerun resumes)")
    parser.add_argument("--text-field", default="text",
                        help="JSON Lines field / Parquet column of the text (default: text)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"tokenizing processes (default: {default_workers()}, every core)")
    parser.add_argument("--eos", default=None,
                        help="the EOS token's text (default: tokenizer_config.json's "
                             "eos_token, else a known end-of-text token)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        m = prepare(args.tokenizer, args.input, args.out, text_field=args.text_field,
                    workers=args.workers, eos=args.eos, progress=not args.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {m['num_documents']} documents, {m['num_tokens']} tokens ({m['dtype']}, "
          f"vocab_size {m['vocab_size']}, eos_id {m['eos_id']}) in {len(m['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
