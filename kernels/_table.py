"""Measured backend choices for ``"auto"``: a JSON table shipped with the package.

``kernel_backend`` resolves ``"auto"`` for the grouped GEMMs on CUDA by looking up which backend
was measured fastest on the same GPU family at the nearest measured shape. Nothing is timed at
run time: the table is written by benchmark scripts (``record``) and read here.

The file (``backend_table.json`` next to this module) holds ``{"version": 1, "rows": [...]}``,
one row per measurement::

    {"family": "sm90", "device": "NVIDIA H200", "date": "2026-12-04", "torch": "2.11.0",
     "triton": "3.6.0", "op": "grouped_gemm", "k": 4096, "n": 28672, "groups": 8,
     "rows": 32768, "routing": "uniform", "ms": {"triton": 1.28, "grouped_mm": 1.0},
     "best": "grouped_mm", "source": "scripts/bench_kernels.py", "note": "..."}

* ``op``: ``"grouped_gemm"`` (x [rows, k] times w [groups, k, n]) or ``"swiglu_experts"``
  (k = H, n = F: both GEMMs and the activation).
* ``rows``: the rows of x, i.e. routed token copies (T * top-k when dropless), not tokens.
* ``ms``: forward + backward medians per backend; only their ratios are compared, so a row may
  hold relative times (say so in ``note``). ``best`` is the fastest entry of ``ms``.

Nearest shape: the squared distance of log2 k, log2 n, log2 groups and log2 rows-per-group
(rows / groups). Rows at the same distance (e.g. the uniform and the Zipf routing of one shape)
are pooled: the backend with the smallest geometric mean of its time relative to each row's
fastest wins, among the backends every pooled row measured.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["device_family", "measured_backend", "record", "TABLE_PATH", "OPS"]

TABLE_PATH = Path(__file__).with_name("backend_table.json")
OPS = ("grouped_gemm", "swiglu_experts")
_BACKENDS = ("triton", "grouped_mm", "torch")
_REQUIRED = ("family", "device", "date", "torch", "triton", "op", "k", "n", "groups", "rows",
             "routing", "ms")  # fmt: skip
# One measured shape and routing per (family, op, ...) key: a newer measurement replaces it.
_KEY = ("family", "op", "k", "n", "groups", "rows", "routing")
_cache: dict[str, tuple[tuple[int, int], list[dict]]] = {}
# measured_backend's answers: it runs on every grouped GEMM call of an "auto" run, so a shape
# is looked up once per process (and table file); record() forgets them
_choices: dict[tuple, str | None] = {}


def device_family(device: torch.device) -> str:
    """``"sm90"`` for a CUDA device of capability (9, 0), ``"cpu"`` for CPU, else the type.

    ROCm devices report ``"rocm-<gfx arch>"`` (their CUDA-style capability means nothing).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(device).gcnArchName
        return "rocm-" + arch.split(":")[0]
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def _load(path: Path) -> list[dict]:
    """The rows of a table file (cached until the file changes); [] when it does not exist."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return []
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _cache.get(str(path))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("version") != 1 or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not a foldmesh backend table (expected version 1 and rows)")
    _cache[str(path)] = (stamp, data["rows"])
    return data["rows"]


def _distance(row: dict, k: int, n: int, groups: int, rows: int) -> float:
    def lg(v: float) -> float:
        return math.log2(max(v, 1))

    mine = (k, n, groups, rows / max(groups, 1))
    theirs = (row["k"], row["n"], row["groups"], row["rows"] / max(row["groups"], 1))
    return sum((lg(a) - lg(b)) ** 2 for a, b in zip(mine, theirs, strict=True))


def _pooled_best(rows: list[dict]) -> str:
    common = set.intersection(*(set(r["ms"]) for r in rows))
    if not common:
        return rows[0]["best"]

    def score(backend: str) -> float:
        return sum(math.log(r["ms"][backend] / min(r["ms"].values())) for r in rows)

    return min(sorted(common), key=score)


def measured_backend(op: str, device: torch.device, *, k: int, n: int, groups: int,
                     rows: int) -> str | None:  # fmt: skip
    """The backend measured fastest for ``op`` on ``device``'s family at the nearest shape.

    Args:
        op: ``"grouped_gemm"`` (k = K, n = M of w [G, K, M]) or ``"swiglu_experts"`` (k = H,
            n = F). A family without ``swiglu_experts`` rows answers from its ``grouped_gemm``
            rows at the up projection (K = H, M = 2F), the larger of the two GEMMs.
        device: where the op runs (see ``device_family``).
        k, n, groups: the weight dims; rows: the rows of x (N).

    Returns:
        ``"triton"``, ``"grouped_mm"`` or ``"torch"``, or None when the table has no row for
        this family (and op).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: the table covers {OPS}")
    family = device_family(device)
    key = (str(TABLE_PATH), family, op, k, n, groups, rows)
    if key not in _choices:
        _choices[key] = _nearest_best(op, family, k, n, groups, rows)
    return _choices[key]


def _nearest_best(op: str, family: str, k: int, n: int, groups: int, rows: int) -> str | None:
    mine = [r for r in _load(TABLE_PATH) if r["family"] == family]
    candidates = [r for r in mine if r["op"] == op]
    if not candidates and op == "swiglu_experts":
        candidates, n = [r for r in mine if r["op"] == "grouped_gemm"], 2 * n
    if not candidates:
        return None
    dist = [_distance(r, k, n, groups, rows) for r in candidates]
    nearest = min(dist)
    return _pooled_best([r for r, d in zip(candidates, dist, strict=True) if d <= nearest + 1e-9])


def _validated(row: dict) -> dict:
    missing = [key for key in _REQUIRED if key not in row]
    if missing:
        raise ValueError(f"table row lacks {missing}: {row}")
    if row["op"] not in OPS:
        raise ValueError(f"table row op must be one of {OPS}, got {row['op']!r}")
    if not all(isinstance(row[k], int) and row[k] > 0 for k in ("k", "n", "groups", "rows")):
        raise ValueError(f"table row k, n, groups and rows must be positive ints: {row}")
    ms = row["ms"]
    if not ms or any(b not in _BACKENDS for b in ms) or any(not v > 0 for v in ms.values()):
        raise ValueError(f"table row ms must map some of {_BACKENDS} to positive times, got {ms}")
    best = min(ms, key=ms.get)
    if row.get("best", best) != best:
        raise ValueError(f"table row says best = {row['best']!r} but its fastest ms is {best!r}")
    return {**row, "best": best}


def _dumps(rows: list[dict]) -> str:
    # One row per line keeps the diffs of a re-measured row to one line.
    body = ",\n".join("  " + json.dumps(r, sort_keys=False) for r in rows)
    return '{\n "version": 1,\n "rows": [\n' + body + "\n ]\n}\n"


def record(rows: list[dict], path: str | os.PathLike | None = None) -> Path:
    """Merge measured rows into a table file and return its path.

    A row replaces the stored row with the same family, op, k, n, groups, rows and routing;
    other rows are kept. ``best`` is filled in (or checked) from ``ms``. The file is written to
    a temporary file in the same folder and moved into place with ``os.replace``, so a reader
    sees the old table or the new one, never a partial file. Two concurrent writers are not
    serialised: the last one wins.

    Args:
        rows: measurements as described in the module docstring.
        path: the table file; default ``TABLE_PATH``, the one shipped with the package.
    """
    path = Path(path) if path is not None else TABLE_PATH
    merged = {tuple(r[k] for k in _KEY): r for r in _load(path)}
    for row in rows:
        row = _validated(row)
        merged[tuple(row[k] for k in _KEY)] = row
    ordered = [merged[key] for key in sorted(merged)]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_dumps(ordered))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _cache.pop(str(path), None)
    _choices.clear()
    return path
