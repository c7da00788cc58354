"""What the trainer's rank 0 shows and records: log lines, a progress bar, metrics.jsonl.

``run_dir/metrics.jsonl`` holds one JSON object per line, each with a ``kind``:

- ``"train"``: step, loss, aux_loss, z_loss, lr, grad_norm, tokens_per_s, mfu, peak_mem_gib,
  step_time_s, skipped, experts (any may be None), plus ``time`` (unix seconds). ``experts``
  maps a layer index (str) to ``{"counts": [E ints], "max_over_mean": float, "dropped": float}``.
- ``"val"``: step, val_loss, time.
- ``"event"``: step, message, time (resumes, skipped steps, ...).

The file is opened in append mode, so a resumed run continues it; records written after the
last checkpoint then appear twice, and readers keep the last record per (kind, step)
(``foldmesh.plot`` does). Non-finite floats are written as Python's json writes them
(``NaN``, ``Infinity``), which ``read_metrics`` reads back.

``sinks`` (``foldmesh.train._dashboards``: TensorBoard, W&B) get the same records' scalars.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def on_terminal() -> bool:
    """True when both stdout and stderr are terminals. A progress bar redraws its line with
    carriage returns, which fill a batch job's log (Slurm, nohup, tee, CI) with frames, so
    bars are drawn only where a person watches them."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _jsonable(obj: Any) -> Any:
    # Tensors and numpy scalars slip into records easily; .tolist() turns a 0-d one into a
    # Python number and a 1-d one (expert counts) into a list.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"metrics record value of type {type(obj).__name__} is not JSON-serializable")


def _si(x: float) -> str:
    """12345.6 -> '12.3k': throughput without a wall of digits."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _worst_layers(experts: dict) -> str:
    """'load 1.42 (L3) drop 0.8% (L1)': the most unbalanced and the most dropping layer."""
    load = {k: v["max_over_mean"] for k, v in experts.items() if v.get("max_over_mean") is not None}
    drop = {k: v["dropped"] for k, v in experts.items() if v.get("dropped") is not None}
    parts = []
    if load:
        k = max(load, key=lambda k: load[k])
        parts.append(f"load max/mean {load[k]:.2f} (L{k})")
    if drop:
        k = max(drop, key=lambda k: drop[k])
        # A layer name only when something was dropped: dropless runs show "drop 0%".
        parts.append(f"drop {100 * drop[k]:.1f}% (L{k})" if drop[k] > 0 else "drop 0%")
    return " ".join(parts)


class MetricsLogger:
    """Rank 0's log lines, progress bar and ``run_dir/metrics.jsonl``.

    Args:
        run_dir: where metrics.jsonl is written (created if missing).
        total_steps: the run's last step, for "step/total" and the bar's ETA.
        progress: show a tqdm bar on stderr. It is drawn only when stdout and stderr are
            terminals (``on_terminal``); otherwise only the log lines are written, flushed.
        enabled: False on ranks other than 0: every method does nothing, no file is opened.
        start_step: the step a resumed run continues from (where the bar starts).
        sinks: dashboards given each train and val record's scalars: objects with
            ``open(start_step)`` (called before the first record), ``log(step, scalars)``
            and ``close()`` (see ``foldmesh.train._dashboards``).

    Log lines go to stdout; while the bar is shown they are printed above it.
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        *,
        progress: bool = True,
        enabled: bool = True,
        start_step: int = 0,
        sinks: list | tuple = (),
    ) -> None:
        self.enabled = enabled
        self._sinks, self._sinks_open = list(sinks) if enabled else [], False
        self.total_steps = total_steps
        self.start_step = start_step
        self.progress = progress and enabled and on_terminal()
        self._bar: tqdm | None = None
        self._file = None
        if not enabled:
            return
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A crash mid-write leaves a last line without its newline; end it, so the resumed
        # run's first record starts on a line of its own and only the broken one is lost.
        torn = self.path.exists() and self.path.stat().st_size > 0 and not self._ends_in_newline()
        self._file = open(self.path, "a", encoding="utf-8")
        if torn:
            self._file.write("\n")

    def _ends_in_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, 2)
            return f.read(1) == b"\n"

    # -- records ------------------------------------------------------------------------

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        # Flushed per record: a crash loses at most the record being written.
        self._file.flush()
        if record["kind"] in ("train", "val") and self._sinks:
            from ._dashboards import scalars

            if not self._sinks_open:  # opened late: a resume has set start_step by now
                for sink in self._sinks:
                    sink.open(self.start_step)
                self._sinks_open = True
            for sink in self._sinks:
                sink.log(record["step"], scalars(record))

    def _print(self, line: str) -> None:
        if self._bar is None:
            print(line, flush=True)
            return
        # Clears the bar (stderr) before printing to stdout and redraws it after, so the
        # two streams do not interleave on one terminal line.
        with tqdm.external_write_mode(file=sys.stdout):
            print(line, flush=True)

    def _step(self, step: int) -> str:
        width = len(str(self.total_steps))
        return f"step {step:>{width}}/{self.total_steps}"

    def log_train(self, record: dict) -> None:
        """Record a training step (keys in the module docstring) and print one line."""
        if not self.enabled:
            return
        self._write({"kind": "train", **record, "time": time.time()})
        r = record.get
        parts = [self._step(r("step"))]
        for key, label, fmt in (
            ("loss", "loss", "{:.4f}"),
            ("aux_loss", "aux", "{:.4f}"),
            ("lr", "lr", "{:.2e}"),
            ("grad_norm", "grad", "{:.3g}"),
        ):
            if r(key) is not None:
                parts.append(f"{label} {fmt.format(r(key))}")
        if r("tokens_per_s") is not None:
            parts.append(f"{_si(r('tokens_per_s'))} tok/s")
        if r("mfu") is not None:
            parts.append(f"mfu {100 * r('mfu'):.1f}%")
        if r("peak_mem_gib") is not None:
            parts.append(f"mem {r('peak_mem_gib'):.1f} GiB")
        if r("experts"):
            parts.append(_worst_layers(r("experts")))
        if r("skipped"):
            parts.append("SKIPPED")
        self._print(" | ".join(parts))

    def log_val(self, step: int, val_loss: float) -> None:
        """Record a validation loss and print it."""
        if not self.enabled:
            return
        self._write({"kind": "val", "step": step, "val_loss": val_loss, "time": time.time()})
        self._print(f"{self._step(step)} | val loss {val_loss:.4f}")

    def log_event(self, step: int, message: str) -> None:
        """Record and print something that happened, e.g. "resumed from step 100"."""
        if not self.enabled:
            return
        self._write({"kind": "event", "step": step, "message": message, "time": time.time()})
        self._print(f"{self._step(step)} | {message}")

    # -- progress bar -------------------------------------------------------------------

    def progress_update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Move the bar to ``step`` (absolute, not an increment) and show loss and tokens/s."""
        if not self.progress:
            return
        if self._bar is None:
            # Created on first use so that nothing is drawn before the first step finishes.
            self._bar = tqdm(
                total=self.total_steps,
                initial=self.start_step,
                file=sys.stderr,
                unit="step",
                dynamic_ncols=True,
            )
        self._bar.set_postfix({"loss": f"{loss:.4f}", "tok/s": _si(tokens_per_s)}, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Close the bar and the metrics file; further calls do nothing."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        for sink in self._sinks:
            sink.close()
        self._sinks = []
        self.enabled = self.progress = False

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl`` in file order.

    A truncated last line (a crash mid-write) is skipped silently. A broken line elsewhere
    (a crash followed by a resume that appended after it) is skipped with a warning.
    Raises FileNotFoundError when the file is missing.
    """
    path = Path(run_dir) / METRICS_FILE
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                warnings.warn(f"{path}:{i + 1}: skipped a broken record", stacklevel=2)
    return records
