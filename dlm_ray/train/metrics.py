"""Training metrics, written once as they happen: ``metrics.jsonl`` (and TensorBoard) in the run
directory, the console line of each log window (and ``say``, how a worker prints a line), the
summary and loss curve built from them, and the run directory's marker files (``run_marker``).

Everything goes through the pyarrow filesystem of the run directory, so a run on ``s3://`` or
``gs://`` keeps its metrics there too. Object stores cannot append, so there ``metrics.jsonl`` is
rewritten whole at most every ``REMOTE_FLUSH_S`` seconds (and at every checkpoint and at the end);
locally each record is appended as it comes. A resumed run first drops the records past the step
it resumes from, so the file always tells one consistent history.

    tensorboard --logdir <storage_path>/<run_name>/tensorboard
"""

from __future__ import annotations

import io
import json
import math
import sys
import tempfile
import time
from typing import Any, Callable

from dlm_ray.data.sources import iter_jsonl_records
from dlm_ray.io.storage import filesystem_for

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVE_FILE = "loss_curve.png"
TB_DIR = "tensorboard"
REMOTE_FLUSH_S = 60.0


def read_metrics(run_uri: str) -> list[dict[str, Any]]:
    """Every record of a run's ``metrics.jsonl`` (empty for a run that has none yet)."""
    from pyarrow import fs as pafs

    filesystem, root = filesystem_for(run_uri)
    path = f"{root}/{METRICS_FILE}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return []
    records = []
    for r in iter_jsonl_records(f"{run_uri.rstrip('/')}/{METRICS_FILE}"):
        if r.record is None:
            raise ValueError(f"{run_uri}/{METRICS_FILE}: {r.where}: {r.error}")
        records.append(r.record)
    return records


class MetricsLog:
    """The run's metric records: appended to ``metrics.jsonl``, mirrored to TensorBoard if asked."""

    def __init__(self, run_uri: str, *, resume_step: int = 0, tensorboard: bool = False) -> None:
        self.filesystem, self.root = filesystem_for(run_uri)
        self.remote = "://" in run_uri
        self.filesystem.create_dir(self.root, recursive=True)
        self.records = [r for r in read_metrics(run_uri) if r.get("step", 0) <= resume_step]
        self._rewrite()  # drop what a killed run logged after its last checkpoint
        self._flushed_at = time.monotonic()
        self._dirty = False
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the [tensorboard] extra

            # Event files are written locally; for a remote run they are copied up at each flush.
            self.tb_local = tempfile.mkdtemp(prefix="dlm-tb-") if self.remote else f"{self.root}/{TB_DIR}"
            self.tb = SummaryWriter(self.tb_local, purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        line = json.dumps(record) + "\n"
        if self.remote:
            self._dirty = True
            if time.monotonic() - self._flushed_at > REMOTE_FLUSH_S:
                self.flush()
        else:
            with self.filesystem.open_append_stream(f"{self.root}/{METRICS_FILE}") as f:
                f.write(line.encode())
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def flush(self) -> None:
        """Make everything logged so far visible in the run directory."""
        if self.remote and self._dirty:
            self._rewrite()
            self._dirty = False
        if self.tb is not None:
            self.tb.flush()
            if self.remote:
                from pyarrow import fs as pafs

                pafs.copy_files(self.tb_local, f"{self.root}/{TB_DIR}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=self.filesystem)
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()

    def _rewrite(self) -> None:
        with self.filesystem.open_output_stream(f"{self.root}/{METRICS_FILE}") as f:
            f.write("".join(json.dumps(r) + "\n" for r in self.records).encode())


def run_marker(run_uri: str, name: str, *, mark: bool = False) -> bool:
    """Whether the marker file ``name`` exists in the run directory (any filesystem); with ``mark``,
    create it first. The fault drills use these to fire once per run, across restarts."""
    from pyarrow import fs as pafs

    filesystem, root = filesystem_for(run_uri)
    if mark:
        filesystem.create_dir(root, recursive=True)
        with filesystem.open_output_stream(f"{root}/{name}") as f:
            f.write(b"1")
    return filesystem.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound


# ------------------------------------------------------------------------------------------ console


def say(line: str) -> None:
    """A line on a worker's stdout, which the driver shows. Not ``print``: Ray Train patches it to
    log the line as well, and the driver then shows it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def console_line(record: dict[str, Any], *, max_steps: int, seconds_per_step: float | None) -> str:
    """One log window as a line a person reads: step, loss, throughput, ETA (and eval if present)."""
    parts = [f"step {record['step']:>{len(str(max_steps))}}/{max_steps}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if record.get("mfu") is not None:
            parts.append(f"MFU {record['mfu']:.1%}")
        parts.append(f"lr {record['lr']:.2e}")
        parts.append(f"data wait {record['data_wait_frac']:.0%}")
    if "val_nelbo_bits" in record:
        bits = record["val_nelbo_bits"]
        parts.append("held-out NELBO: no held-out rows" if bits is None else f"held-out NELBO {bits:.3f} bits/token")
    if seconds_per_step is not None and record["step"] < max_steps:
        parts.append(f"ETA {_duration(seconds_per_step * (max_steps - record['step']))}")
    return "[train] " + " | ".join(parts)


# ------------------------------------------------------------------------------------------ summary


def write_summary(run_uri: str, extra: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` and ``loss_curve.png`` in the run directory, from its ``metrics.jsonl``."""
    history = read_metrics(run_uri)
    summary = {"run": run_uri, **extra,
               "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
               "final_val_nelbo_bits": next((h["val_nelbo_bits"] for h in reversed(history)
                                             if h.get("val_nelbo_bits") is not None), None),
               "metrics": f"{run_uri}/{METRICS_FILE}"}
    write_json_and_chart(run_uri, SUMMARY_FILE, summary, CURVE_FILE, lambda out: plot_losses(history, out))
    return summary


def write_json_and_chart(uri: str, json_name: str, record: dict[str, Any], png_name: str,
                         draw: Callable[[Any], None]) -> None:
    """``record`` as JSON and the PNG ``draw`` makes, into the directory ``uri`` (local or a
    pyarrow URI), created if missing."""
    filesystem, root = filesystem_for(uri)
    filesystem.create_dir(root, recursive=True)
    with filesystem.open_output_stream(f"{root}/{json_name}") as f:
        f.write(json.dumps(record, indent=2).encode())
    png = io.BytesIO()
    draw(png)
    with filesystem.open_output_stream(f"{root}/{png_name}") as f:
        f.write(png.getvalue())


def plot_losses(history: list[dict[str, Any]], out: Any) -> None:
    """Training loss and held-out NELBO (both nats/token) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    pts = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if pts:
        ax.plot(*zip(*pts), label="train loss (NELBO bound, nats per maskable token)")
    val = [(h["step"], h["val_nelbo_bits"] * math.log(2)) for h in history if h.get("val_nelbo_bits") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="held-out NELBO (nats/token)")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
