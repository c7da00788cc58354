"""The end of ``bench_gpu.py``: read the parts' results back, write the JSON and the markdown.

Each part's results file holds one JSON record per line (``_bench_common.Emitter``): table
rows, named values and notes, in the order they were measured; a part killed at its limit
leaves the records it wrote before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench_kernels import markdown

TITLES = {
    "device": "Device",
    "ceilings": "Ceilings (same machine, same run)",
    "check.summary": "Kernel checks: summary",
    "check": "Kernel checks (every op, backend and case against the references)",
    "kernels.single": "Single kernels (the planner's dense, copy, attention and norm rates)",
    "kernels.permute": "Permute / unpermute (GB/s = row bytes read + written per second)",
    "kernels.gemm": "Grouped GEMM per backend (TFLOP/s over real rows; fwd+bwd = 3x the "
                    "forward FLOPs)",
    "kernels.swiglu_experts": "swiglu_experts per backend, forward + backward (routed GEMM "
                              "FLOPs 18·N·H·F)",
    "layer.check": "MoE layer: foldmesh against the reference before timing",
    "layer": "One MoE layer forward + backward (TFLOP/s over the routed GEMMs, 18·T·k·H·F)",
    "trainer": "Trainer on one GPU against the planner (steady = median of steps after the "
               "third)",
    "trainer.steps": "Trainer: every step",
}


def read_records(path: Path) -> list[dict]:
    """The records of one results file; a torn last line (a killed writer) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def collect(parts: dict) -> dict:
    """{"tables": {name: rows}, "values": {key: last value}, "notes": {part: [text]}}."""
    tables, values, notes = {}, {}, {}
    for name, part in parts.items():
        for rec in part["records"]:
            if "table" in rec:
                tables.setdefault(rec["table"], []).append(rec["row"])
            elif "key" in rec:
                values[rec["key"]] = rec["value"]
            elif "note" in rec:
                notes.setdefault(name, []).append(rec["note"])
    return {"tables": tables, "values": values, "notes": notes}


def backend_table(tables: dict) -> list[dict]:
    """Which backend was fastest per shape, forward + backward (from the kernels part)."""
    rows = []
    for row in tables.get("kernels.gemm", []) + tables.get("kernels.swiglu_experts", []):
        if not row["op"].endswith("fwd+bwd"):
            continue
        ms = {k[:-3]: v for k, v in row.items()
              if k.endswith(" ms") and k not in ("dense ms", "_grouped_mm ms")}
        out = {"model": row["model"], "T": row["T"], "routing": row["routing"],
               "op": row["op"].replace(" fwd+bwd", "")}
        out |= {f"{b} ms": t for b, t in ms.items()}
        rows.append(out | {"best": row.get("best", "-")})
    return rows


def _fence(value) -> str:
    return "```json\n" + json.dumps(value, indent=1, default=str) + "\n```"


def _clean(rows: list[dict]) -> list[dict]:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float) and math.isnan(v):
            return "-"
        if isinstance(v, dict):
            return "; ".join(f"{k}: {cell(x)}" for k, x in v.items()) or "-"
        return v

    return [{k: cell(v) for k, v in r.items()} for r in rows]


def markdown_report(meta: dict, parts: dict, results: dict) -> str:
    tables, values, notes = results["tables"], results["values"], results["notes"]
    out = ["# foldmesh GPU benchmark (scripts/bench_gpu.py)", ""]
    if meta.get("dry_run"):
        out += ["**DRY RUN on CPU: tiny shapes, the timings mean nothing.**", ""]
    foreign = meta.get("foreign_gpu_processes") or {}
    if foreign:
        out += ["**WARNING: OTHER PROCESSES WERE ON THE GPU; the timings below may be low by "
                "up to 2x and only ratios measured together are usable:**", ""]
        out += [f"- before {when}: {', '.join(lines)}" for when, lines in foreign.items()]
        out += [""]
    out += [f"- command: `{meta['command']}`", f"- date: {meta['date']}",
            f"- host: {meta.get('host', '?')}; nvidia-smi: {meta.get('nvidia_smi', '?')}", ""]
    out += ["## Parts", "", markdown(_clean([{"part": n, "status": p["status"],
                                              "seconds": p["seconds"], "limit s": p["limit"],
                                              "records": len(p["records"])}
                                             for n, p in parts.items()])), ""]
    for table in [t for t in TITLES if t in tables] + [t for t in tables if t not in TITLES]:
        out += [f"## {TITLES.get(table, table)}", "", markdown(_clean(tables[table])), ""]
    best = backend_table(tables)
    if best:
        out += ["## Backend table: the fastest backend per shape (forward + backward)", "",
                markdown(_clean(best)), ""]
        if "backend_table_path" in values:
            out += [f"Recorded in `{values['backend_table_path']}`.", ""]
    if "planner_rates" in values:
        out += ["## Planner rates (`planner_rates`)", "", _fence(values["planner_rates"]), ""]
        if "planner_rates_path" in values:
            out += [f"Saved to `{values['planner_rates_path']}`.", ""]
    if notes:
        out += ["## Notes", ""]
        for part, texts in notes.items():
            out += [f"- **{part}**: " + text.replace("\n", "\n  ") for text in texts]
        out += [""]
    return "\n".join(out)


def _finite(value):
    """NaN and infinities as null: the JSON file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write(out: Path, meta: dict, parts: dict) -> tuple[Path, Path]:
    """Write ``out`` (markdown) and ``out`` with suffix .json; return both paths."""
    results = collect(parts)
    payload = {"meta": meta, "parts": parts, "tables": results["tables"],
               "planner_rates": results["values"].get("planner_rates"),
               "backend_table": backend_table(results["tables"]),
               "values": results["values"], "notes": results["notes"]}
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(_finite(payload), indent=1, default=str,
                                    allow_nan=False) + "\n")
    out.write_text(markdown_report(meta, parts, results) + "\n")
    return out, json_path
