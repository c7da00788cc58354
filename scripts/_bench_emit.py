"""Results as they come: a part prints every result line the moment it exists and appends the
same result as one JSON line to its results file, flushed, so that a part killed at its time
limit keeps everything it measured until then. No torch here: the parent and the hidden
``_hang`` part import it too.
"""

from __future__ import annotations

import json
import math
import os


class Emitter:
    """Print a part's results and append them to its results file, each as it comes.

    Records: ``{"table": name, "row": {...}}`` (a row of a report table), ``{"key": name,
    "value": ...}`` (one named value, e.g. ``planner_rates``; the last one wins) and
    ``{"note": text}``.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.file = open(path, "a", encoding="utf-8") if path else None

    def _write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record, default=_jsonable) + "\n")
            self.file.flush()

    def row(self, table: str, row: dict) -> None:
        self._write({"table": table, "row": row})
        print(f"[{table}] " + "  ".join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)

    def put(self, key: str, value, show: bool = True) -> None:
        self._write({"key": key, "value": value})
        if show:
            print(f"[{key}] {json.dumps(value, default=_jsonable)}", flush=True)

    def note(self, text: str) -> None:
        self._write({"note": text})
        print(text, flush=True)


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def fmt(value) -> str:
    """Four significant digits for floats, as is for the rest."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)
