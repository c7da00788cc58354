"""The prepared token directory: file names, the manifest, and ``verify``.

A directory written by ``foldmesh.data.prepare`` holds, for input file ``i`` (5+ digits)::

    00000.bin      the tokens of input 0: uint16 or uint32 little-endian ids, its documents
                   back to back, each followed by EOS
    00000.idx      int64 little-endian: the exclusive end of every document in 00000.bin,
                   counted in tokens (EOS included); its last entry is the shard's token count
    00000.json     the shard's record (input, tokenizer, counts, sizes, sha256); renamed into
                   place last, so a shard is complete exactly when its record exists
    MANIFEST.json  written last, atomically: the tokenizer's identity, dtype, vocab size, EOS
                   id, totals, and every shard's record (its input file with size and mtime;
                   both output files with size and sha256; token and document counts)

The ``*.bin`` files in name order are one plain token stream, so ``data.source = "tokens"``
with ``data.dtype`` = the manifest's ``dtype`` reads the same directory too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from ._errors import DataError

MANIFEST = "MANIFEST.json"
FORMAT = "foldmesh.tokens"
VERSION = 1
INDEX_DTYPE = np.dtype("<i8")
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SHARD_RE = re.compile(r"^(\d{5,})\.(bin|idx|json)(\.tmp)?$")
_HASH_CHUNK = 1 << 24


def shard_stem(index: int) -> str:
    return f"{index:05d}"


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` through ``path.tmp`` and a rename: readers see the old file
    or the whole new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def input_record(path: Path, fmt: str, text_field: str) -> dict:
    """What identifies an input file's contents without reading it: path, size, mtime."""
    st = path.stat()
    return {"path": str(path.resolve()), "format": fmt, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "text_field": None if fmt == "text" else text_field}


def _rerun(path: Path) -> str:
    return (f"rerun python -m foldmesh.data.prepare with --out {path} (it redoes only missing "
            "or changed shards)")


def read_manifest(path: str | Path) -> dict:
    """The manifest of the prepared directory ``path``; ``DataError`` when it is missing (an
    unfinished prepare) or not this format."""
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise DataError(f"{path} is not a directory: point data.path at the --out directory "
                        "of python -m foldmesh.data.prepare")
    if not file.is_file():
        raise DataError(f"{path} has no {MANIFEST}: its prepare did not finish; {_rerun(path)}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{file} is unreadable ({e}): {_rerun(path)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{file} is not a foldmesh token manifest: {_rerun(path)}")
    if manifest.get("version") != VERSION:
        raise DataError(f"{file} has format version {manifest.get('version')}, this foldmesh "
                        f"reads version {VERSION}: {_rerun(path)}")
    return manifest


def check_shard_files(path: Path, shard: dict, dtype: str, checksums: bool = False) -> None:
    """Raise ``DataError`` naming the file when a shard's token or index file is missing, has
    another size than its counts give, or (``checksums``) another sha256."""
    expect = {"tokens": (shard["tokens"] * TOKEN_DTYPES[dtype].itemsize,
                         f"{shard['tokens']} {dtype} tokens"),
              "index": (shard["documents"] * INDEX_DTYPE.itemsize,
                        f"{shard['documents']} int64 document ends")}
    for kind in ("tokens", "index"):
        rec = shard["files"][kind]
        file = path / rec["name"]
        if not file.is_file():
            raise DataError(f"{file} is missing: {_rerun(path)}")
        size = file.stat().st_size
        want, what = expect[kind]
        if size != rec["size"] or size != want:
            raise DataError(f"{file} has {size} bytes, the manifest says {rec['size']} "
                            f"({what}): the file is truncated or changed; {_rerun(path)}")
        if checksums and file_sha256(file) != rec["sha256"]:
            raise DataError(f"{file} does not match its sha256 in the manifest: the file is "
                            f"damaged; {_rerun(path)}")
    if shard["documents"]:
        index = path / shard["files"]["index"]["name"]
        first = np.fromfile(index, dtype=INDEX_DTYPE, count=1)
        last = np.fromfile(index, dtype=INDEX_DTYPE, count=1, offset=expect["index"][0] - 8)
        if int(last[0]) != shard["tokens"] or int(first[0]) < 1:
            raise DataError(f"{path / shard['files']['index']['name']} does not end at the "
                            f"shard's {shard['tokens']} tokens: {_rerun(path)}")


def check_input(path: Path, shard: dict) -> None:
    """Raise ``DataError`` when the shard's input file still exists but its size or mtime
    changed since it was tokenized. An input that is gone is not checked: a prepared
    directory may be copied to machines without the corpus."""
    rec = shard["input"]
    src = Path(rec["path"])
    if not src.exists():
        return
    st = src.stat()
    if st.st_size != rec["size"] or st.st_mtime_ns != rec["mtime_ns"]:
        raise DataError(f"input {src} changed since {path} was prepared (size {rec['size']} "
                        f"-> {st.st_size}, or its modification time): {_rerun(path)}, or "
                        "verify with check_inputs=False to use the tokens as they are")


def verify(path: str | Path, check_inputs: bool = True, checksums: bool = False) -> dict:
    """Check a prepared directory against its manifest; return the manifest.

    Always: the manifest exists and is complete, every shard file has the size its counts
    give, every index ends at its shard's token count, and the totals add up (a few stat
    calls and one read per shard). ``check_inputs``: every input file still present at its
    recorded path has its recorded size and mtime. ``checksums``: every shard file's
    sha256 (reads all data). Raises ``DataError`` naming the first file that fails.
    """
    path = Path(path)
    manifest = read_manifest(path)
    dtype = manifest["dtype"]
    if dtype not in TOKEN_DTYPES:
        raise DataError(f"{path / MANIFEST} names dtype {dtype!r}: {_rerun(path)}")
    for shard in manifest["shards"]:
        check_shard_files(path, shard, dtype, checksums)
        if check_inputs:
            check_input(path, shard)
    tokens = sum(s["tokens"] for s in manifest["shards"])
    documents = sum(s["documents"] for s in manifest["shards"])
    if (tokens, documents) != (manifest["num_tokens"], manifest["num_documents"]):
        raise DataError(f"{path / MANIFEST}: its shards hold {tokens} tokens in {documents} "
                        f"documents, its totals say {manifest['num_tokens']} in "
                        f"{manifest['num_documents']}: {_rerun(path)}")
    return manifest
