"""Documents (strings) read from local files: text, JSON Lines and Parquet.

A file's format follows its name:

- ``*.jsonl``, ``*.ndjson``, ``*.json``: JSON Lines, one object per line, the document in
  ``text_field``; blank lines are skipped;
- ``*.parquet``: the string column ``text_field``, read with ``pyarrow`` (the optional extra
  ``pip install 'foldmesh[data]'``);
- anything else: a text file, the whole file one document.

Text is decoded as strict UTF-8 from the raw bytes (``"\\r\\n"`` stays as it is), so a
document decodes back to exactly the input. Empty documents (``""``) are skipped: they hold
no token to learn. Every error is a ``DataError`` naming the file (and line or row) and the
setting to change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from ._errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
FORMATS = ("text", "jsonl", "parquet")
_INPUT = "--input / data.path"
_FIELD = "--text-field / data.text_field"
_PARQUET_BATCH = 1024  # rows per pyarrow record batch


def file_format(path: Path) -> str:
    """``"jsonl"``, ``"parquet"`` or ``"text"``, from the file name."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _files_under(root: Path) -> list[Path]:
    """Regular files under ``root``, sorted by relative path; hidden names are skipped."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder, n) for n in names if not n.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files of ``paths`` in order; a directory stands for every file under it (sorted by
    relative path, hidden ones skipped). Each file is checked to exist and open for
    reading; Parquet files need ``pyarrow``."""
    if not paths:
        raise DataError(f"no input files: give text, JSON Lines or Parquet files ({_INPUT})")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            under = _files_under(p)
            if not under:
                raise DataError(f"{p} is a directory without files: fix {_INPUT}")
            files += under
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist: fix {_INPUT}")
    for f in files:
        try:
            with open(f, "rb"):
                pass
        except OSError as e:
            raise DataError(f"cannot read {f} ({e.strerror}): fix {_INPUT}") from None
        if file_format(f) == "parquet":
            _pyarrow(f)
    return files


def read_documents(path: Path, text_field: str = "text") -> Iterator[tuple[str, int]]:
    """Yield ``(document, bytes of the file read so far)`` (the second for progress bars;
    for Parquet an estimate in proportion to rows)."""
    fmt = file_format(path)
    if fmt == "jsonl":
        yield from _jsonl(path, text_field)
    elif fmt == "parquet":
        yield from _parquet(path, text_field)
    else:
        yield from _text(path)


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file (see the module docstring for formats)."""
    for text, _ in read_documents(path, text_field):
        yield text


def iter_corpus(paths: Sequence[str | Path], text_field: str = "text") -> Iterator[str]:
    """The documents of every file of ``paths`` (see ``expand_inputs``), in order; raises
    ``DataError`` at the end when there were none."""
    files = expand_inputs(paths)
    count = 0
    for f in files:
        for text in iter_documents(f, text_field):
            count += 1
            yield text
    if not count:
        raise empty_corpus(files)


def empty_corpus(files: Sequence[Path]) -> DataError:
    shown = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more" if len(files) > 3
                                              else "")
    return DataError(f"the corpus is empty: {shown} hold no non-empty document; fix {_INPUT} "
                     f"(or {_FIELD} for JSON Lines and Parquet)")


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start}: {raw[e.start:e.end]!r}): "
                        f"convert the file to UTF-8 or leave it out of {_INPUT}") from None


def _kind(value) -> str:
    """The JSON name of a parsed value's type."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names[type(value)]


def _read_error(path: Path, e: OSError) -> DataError:
    return DataError(f"cannot read {path} ({e.strerror}): fix {_INPUT}")


def _text(path: Path) -> Iterator[tuple[str, int]]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _read_error(path, e) from None
    if raw:
        yield _utf8(raw, str(path)), len(raw)


def _jsonl(path: Path, field: str) -> Iterator[tuple[str, int]]:
    done = 0
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                done += len(raw)
                where = f"{path}:{lineno}"
                line = _utf8(raw, where)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    hint = (" (a JSON array is not JSON Lines: write one object per line)"
                            if lineno == 1 and line.lstrip().startswith("[") else "")
                    raise DataError(f"{where}: bad JSON ({e.msg} at column {e.colno}){hint}: "
                                    f"fix the line or leave the file out of {_INPUT}") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: a JSON {_kind(obj)}, not an object with "
                                    f"a {field!r} field: fix the line or {_INPUT}")
                if field not in obj:
                    raise DataError(f"{where}: no field {field!r} (the line has "
                                    f"{sorted(obj)[:8]}): set {_FIELD} to the field that "
                                    "holds the text")
                text = obj[field]
                if not isinstance(text, str):
                    raise DataError(f"{where}: field {field!r} is a JSON {_kind(text)}, not a "
                                    f"string: set {_FIELD} to the field that holds the text")
                if text:
                    yield text, done
    except OSError as e:
        raise _read_error(path, e) from None


def _pyarrow(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path} is Parquet, which needs pyarrow: pip install "
                        "'foldmesh[data]' (or pyarrow)") from None
    return pq


def _parquet(path: Path, field: str) -> Iterator[tuple[str, int]]:
    pq = _pyarrow(path)
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file ({e}): fix {_INPUT}") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (it has {schema.names[:8]}): set "
                        f"{_FIELD} to the column that holds the text")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}, not strings: set {_FIELD} to "
                        "the column that holds the text")
    size, rows, row = path.stat().st_size, max(pf.metadata.num_rows, 1), 0
    batches = pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[field])
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: unreadable after row {row} ({e}): fix {_INPUT}") from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                raise DataError(f"{path}: row {row - 1} has no {field!r} (null): drop such "
                                f"rows or set {_FIELD} to a column without nulls")
            if text:
                yield text, size * row // rows
