"""scripts/bench_gpu.py on CPU: the dry run end to end, the time-boxed parts, streaming.

The dry run runs every part with tiny shapes (the torch path, the Triton interpreter where it
runs, a 2-step trainer); the hidden part ``_hang`` starts a child that ignores SIGTERM, prints
a line and hangs, so that its part must be killed with its children at the limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_gpu.py"
PARTS = ("ceilings", "check", "kernels", "layer", "trainer")
RATE_KEYS = {"gpu", "date", "dense_gemm_tflops", "copy_gbps", "grouped_gemm_tflops",
             "permute_gbps", "attention_tflops", "elementwise_gbps"}


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("FOLDMESH_KERNELS", None)
    return env


def _dead(pid: int) -> bool:
    """No such process, or a zombie waiting for its (new) parent to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split()[1:2] == ["Z"] for line in f if line.startswith("State:"))
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry") / "report.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    return proc, out


def test_dry_run_writes_every_part(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert list(data["parts"]) == list(PARTS)
    for name, part in data["parts"].items():
        assert part["status"] == "ok", (name, part["status"])
        assert part["records"], name
    tables = data["tables"]
    for table in ("device", "ceilings", "check", "check.summary", "kernels.single",
                  "kernels.permute", "kernels.gemm", "kernels.swiglu_experts", "layer.check",
                  "layer", "trainer", "trainer.steps"):
        assert tables.get(table), table
    assert [r for r in tables["check"] if r["result"] == "FAIL"] == []
    assert {r["op"] for r in tables["check"]} == {"permute", "unpermute", "sort_chunks",
                                                  "grouped_gemm", "swiglu_experts"}
    assert {r["config"] for r in tables["trainer"]} == {"configs/single_gpu.toml",
                                                        "configs/two_mixtral_layers.toml"}
    assert all(r["steps"] == 2 for r in tables["trainer"])
    # every foldmesh backend of the layer agreed with the reference before it was timed
    assert {r["result"] for r in tables["layer.check"]} == {"PASS"}
    assert any(r["impl"].startswith("reference") for r in tables["layer"])

    rates = data["planner_rates"]
    assert set(rates) == RATE_KEYS
    for phase in ("fwd", "bwd"):
        assert set(rates["grouped_gemm_tflops"][phase]) == {"small", "medium", "large"}
    assert data["backend_table"]

    # the dry run recorded into files beside the report, never the shipped ones
    from foldmesh.kernels._table import TABLE_PATH

    table_path = Path(data["values"]["backend_table_path"])
    assert table_path.parent == out.parent and table_path.is_file()
    assert table_path.resolve() != TABLE_PATH.resolve()
    rows = json.loads(table_path.read_text())["rows"]
    assert {r["op"] for r in rows} == {"grouped_gemm", "swiglu_experts"}
    assert all(r["best"] == min(r["ms"], key=r["ms"].get) for r in rows)
    if "planner_rates_path" in data["values"]:
        assert Path(data["values"]["planner_rates_path"]).parent == out.parent

    report = out.read_text()
    assert "DRY RUN" in report and "Backend table" in report and "Planner rates" in report
    log = out.with_suffix(".log").read_text()
    assert "[trainer] [trainer]" in log and "[check] [check]" in log


@pytest.fixture(scope="module")
def hang_run(tmp_path_factory):
    """``_hang`` (limit 8 s) then ``ceilings``, the parent's output read line by line."""
    out = tmp_path_factory.mktemp("hang") / "report.md"
    cmd = [sys.executable, str(SCRIPT), "--parts", "_hang,ceilings", "--limit", "_hang=8",
           "--dry-run", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, pid, alive_when_read = [], None, None
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if pid is None and "hang: child pid" in line:
                pid = int(line.split("hang: child pid")[1].split(";")[0])
                # the part kills this child when it ends: alive now means the line came
                # through while the part was still running
                alive_when_read = not _dead(pid)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"rc": rc, "lines": lines, "pid": pid, "alive_when_read": alive_when_read,
            "out": out}


def test_output_streams_while_a_part_runs(hang_run):
    assert hang_run["pid"] is not None, "\n".join(hang_run["lines"])
    assert hang_run["alive_when_read"]
    ended = next(i for i, ln in enumerate(hang_run["lines"]) if "part _hang: timed out" in ln)
    first = next(i for i, ln in enumerate(hang_run["lines"]) if "hang: child pid" in ln)
    assert first < ended


def test_a_hung_part_is_killed_with_its_children(hang_run):
    assert hang_run["rc"] == 1  # a part timed out
    assert _dead(hang_run["pid"]), "the child that ignores SIGTERM outlived its part"
    line = f"hang: child pid {hang_run['pid']}"
    assert any(line in ln for ln in hang_run["lines"])
    out = hang_run["out"]
    assert line in out.with_suffix(".log").read_text()
    data = json.loads(out.with_suffix(".json").read_text())
    hung, after = data["parts"]["_hang"], data["parts"]["ceilings"]
    assert hung["status"].startswith("timed out")
    assert data["tables"]["hang"] == [{"child_pid": hang_run["pid"]}]  # kept after the kill
    assert after["status"] == "ok" and data["tables"]["ceilings"]  # the next part still ran
    assert "timed out" in out.read_text()


def test_other_gpu_processes_are_listed():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from _bench_procs import gpu_processes
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    fake = [sys.executable, "-c", "print('4242, python, 1000 MiB')"]
    assert gpu_processes(fake) == (["4242, python, 1000 MiB"], "")
    assert gpu_processes([sys.executable, "-c", "pass"]) == ([], "")
    lines, why = gpu_processes(["no-such-nvidia-smi-here"])
    assert lines is None and "not found" in why


def test_boot_maps_kernels_without_an_install():
    """A bare copy of the tree (no editable install) still imports foldmesh.kernels."""
    code = (
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path\n"
        "                 if 'Editable' not in getattr(f, '__name__', type(f).__name__)]\n"
        f"sys.path[:] = [p for p in sys.path if p not in ('', {str(ROOT)!r})]\n"
        f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        "import _bench_boot; _bench_boot.boot()\n"
        "import foldmesh.kernels; print(foldmesh.kernels.__file__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == ROOT / "kernels" / "__init__.py"
