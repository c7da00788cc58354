"""The parent's side of ``bench_gpu.py``: run each part as a time-boxed process group whose
output streams through as it comes, and look for other processes on the GPU.

A part starts in a new session (so its own process group, which every child it starts
joins). At its time limit the whole group gets SIGTERM, then SIGKILL after a grace period:
a child that ignores SIGTERM, or an orphan of the part, cannot live on to disturb the parts
after it (the first GPU run lost its measurements to exactly such an orphan). The same
SIGKILL also reaches leftovers of a part that ended by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

NVIDIA_SMI = ["nvidia-smi", "--query-compute-apps=pid,name,used_memory",
              "--format=csv,noheader"]
GRACE_S = 5.0


class Log:
    """Everything the parent shows, also written to a log file, line by line, flushed."""

    def __init__(self, path):
        self.file = open(path, "w", encoding="utf-8")
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            for line in text.split("\n"):
                sys.stdout.write(line + "\n")
                self.file.write(line + "\n")
            sys.stdout.flush()
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def gpu_processes(cmd: list[str] = NVIDIA_SMI) -> tuple[list[str] | None, str]:
    """The compute processes nvidia-smi lists (``pid, name, used_memory`` lines), or None
    and why when it cannot say."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return None, "nvidia-smi not found"
    except subprocess.TimeoutExpired:
        return None, "nvidia-smi did not answer in 20 s"
    if out.returncode != 0:
        return None, f"nvidia-smi failed: {(out.stderr or out.stdout).strip()[:200]}"
    lines = [ln.strip() for ln in out.stdout.splitlines()
             if ln.strip() and "no running" not in ln.lower()]
    return [ln for ln in lines if ln.split(",")[0].strip() != str(os.getpid())], ""


def _pump(stream, prefix: str, log: Log) -> None:
    for raw in iter(stream.readline, b""):
        log(f"{prefix}{raw.decode('utf-8', 'replace').rstrip()}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal: still there
        return True
    return True


def kill_group(proc: subprocess.Popen, grace: float = GRACE_S) -> bool:
    """SIGTERM the process group led by ``proc``, SIGKILL it after ``grace`` seconds (or as
    soon as the leader is gone), reap the leader. True when anything was still running."""
    pgid = proc.pid
    if not _group_alive(pgid):
        proc.wait()
        return False
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)  # whoever ignored SIGTERM or outlived the leader
    except ProcessLookupError:
        pass
    proc.wait()
    return True


def run_part(name: str, cmd: list[str], limit: float, log: Log, env: dict | None = None,
             cwd: str | None = None) -> dict:
    """Run one part to its end or its limit; returns status, exit code and seconds."""
    log(f"[bench] part {name}: start (limit {limit:g} s): {' '.join(cmd)}")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=cwd)
    reader = threading.Thread(target=_pump, args=(proc.stdout, f"[{name}] ", log), daemon=True)
    reader.start()
    status = None
    try:
        rc = proc.wait(timeout=limit)
        status = "ok" if rc == 0 else f"failed (exit code {rc})"
        if kill_group(proc):
            log(f"[bench] part {name}: killed processes it left running")
    except subprocess.TimeoutExpired:
        kill_group(proc)
        status = f"timed out after {limit:g} s (killed with its children)"
    except BaseException:  # Ctrl-C or the parent's own end: take the part with us
        kill_group(proc, grace=1.0)
        raise
    finally:
        reader.join(timeout=10)
        proc.stdout.close()
    seconds = time.monotonic() - start
    log(f"[bench] part {name}: {status} in {seconds:.1f} s")
    return {"status": status, "exit_code": proc.returncode, "seconds": seconds, "limit": limit}


HANG_CHILD = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "time.sleep(3600)")


def hang(emit) -> None:
    """Hidden part ``_hang`` (tests): start a child that ignores SIGTERM, say so, hang."""
    child = subprocess.Popen([sys.executable, "-c", HANG_CHILD])
    emit.row("hang", {"child_pid": child.pid})
    print(f"hang: child pid {child.pid}; now sleeping past the limit", flush=True)
    time.sleep(3600)
