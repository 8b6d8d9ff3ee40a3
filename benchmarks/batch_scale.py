"""Batch generation at scale: one job over N built-in prompts, killed near half way and resumed.

    python benchmarks/batch_scale.py --prompts 1000000 [--gen_length 4 --steps 1] [--kill_at 0.5]

The model is a random ``tiny`` denoiser (0.9M parameters) answering in ``--gen_length`` tokens over
``--steps`` model calls, so that what is measured is the job's own overhead (reading, checking,
batching, writing, exactly-once bookkeeping), not the model. The job is ``jobs/generate.py`` in a
subprocess joined to a local Ray cluster that this script starts; the script watches from outside:

- rows committed (the row counts of the output's checkpoint files), driver and generation-actor RSS,
  object-store use and file counts, sampled every ``--every`` seconds;
- the driver is SIGKILLed at the first sample past ``--kill_at`` of the rows, then the same command
  runs again over the same output. Start-up is the time from launching it to its first committed
  file (which includes generating that file's ``min_rows_per_file`` rows);
- at the end, every id of the output once: the count of distinct ids and the ranks of the built-in
  prompts (``builtin prompt k``) covering 0..N-1 exactly.

Prints a table per tenth of the job (rows/s while a job was generating, peak RSS, object store,
files) and the resume figures. Asserts nothing; writes ``--out``/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import torch

from dlm_ray.config.schema import ModelConfig
from dlm_ray.core.model import Denoiser
from dlm_ray.io.checkpoint import save_inference
from dlm_ray.runtime import init_ray
from dlm_ray.serving.batch import CHECKPOINT_DIR

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


class Watch:
    """Samples of (seconds, rows committed, driver RSS, actor RSS, object store, files) of one output."""

    def __init__(self, output: Path) -> None:
        self.output, self.rows_in, self.samples = output, {}, []
        self.t0 = time.time()

    def committed(self) -> int:
        ckpt = self.output / CHECKPOINT_DIR
        for f in ckpt.glob("*.parquet") if ckpt.exists() else []:
            if f.name not in self.rows_in and not f.name.endswith(".pending.parquet"):
                try:
                    self.rows_in[f.name] = pq.read_metadata(f).num_rows
                except (OSError, pq.lib.ArrowInvalid):  # being renamed into place
                    pass
        return sum(self.rows_in.values())

    def sample(self, driver: psutil.Process | None, with_store: bool) -> dict[str, Any]:
        actors = [p for p in psutil.process_iter(["cmdline"]) if "Completer" in " ".join(p.info["cmdline"] or [])]
        s = {"t": time.time() - self.t0, "rows": self.committed(),
             "driver_mib": _rss(driver), "actor_mib": {p.pid: _rss(p) for p in actors},
             "data_files": len(list(self.output.glob("*.parquet"))), "checkpoint_files": len(self.rows_in)}
        if with_store:
            s["store_mib"] = _object_store_mib()
        self.samples.append(s)
        return s


def _rss(p: psutil.Process | None) -> float:
    try:
        return p.memory_info().rss / MIB if p is not None else 0.0
    except psutil.Error:
        return 0.0


def _object_store_mib() -> float | None:
    from ray._private.internal_api import memory_summary

    m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return float(m.group(1)) if m else None


def run_job(args: list[str], env: dict[str, str], watch: Watch, n: int, kill_at: float | None,
            every: float, log: Path) -> dict[str, Any]:
    """One run of the job; SIGKILLed once ``kill_at`` of the rows are committed (if given)."""
    start, rows0 = watch.sample(None, False), watch.committed()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "generate.py"), *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        driver, first, k = psutil.Process(proc.pid), None, 0
        while proc.poll() is None:
            s = watch.sample(driver, with_store=k % 5 == 0)
            k += 1
            if first is None and s["rows"] > rows0:
                first = s["t"]
            if kill_at is not None and s["rows"] >= kill_at * n:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return {"started": start["t"], "first_commit": first, "killed": time.time() - watch.t0,
                        "rows_at_kill": s["rows"]}
            time.sleep(every)
    if proc.returncode:
        raise SystemExit(f"the job failed ({proc.returncode}); see {log}")
    summary = json.loads(log.read_text().strip().splitlines()[-1])
    return {"started": start["t"], "first_commit": first, "ended": time.time() - watch.t0, "summary": summary}


def _time_at(samples: list[dict[str, Any]], rows: int) -> float:
    """When ``rows`` were committed, interpolated between the samples either side."""
    after = next((i for i, s in enumerate(samples) if s["rows"] >= rows), len(samples) - 1)
    if after == 0:
        return samples[0]["t"]
    a, b = samples[after - 1], samples[after]
    return a["t"] + (b["t"] - a["t"]) * (rows - a["rows"]) / max(1, b["rows"] - a["rows"])


def tenths(samples: list[dict[str, Any]], n: int, gaps: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """Per tenth of the rows: rows/s over the time a job was generating (each job's start-up up to its
    first committed file left out: the first tenth is over-counted by that file's rows, ~1% at 1M),
    peak RSS of the driver and of the largest actor, peak object store, files at its end."""
    table, prev_t, prev_rows = [], samples[0]["t"], 0
    for k in range(1, 11):
        rows = k * n // 10
        t = _time_at(samples, rows)
        inside = [s for s in samples if prev_t <= s["t"] <= t] or [min(samples, key=lambda s: abs(s["t"] - t))]
        span = t - prev_t - sum(max(0.0, min(t, b) - max(prev_t, a)) for a, b in gaps)
        table.append({"tenth": k, "seconds": round(span, 1),
                      "rows_per_s": round((rows - prev_rows) / span, 1) if span > 0 else None,
                      "driver_peak_mib": round(max(s["driver_mib"] for s in inside)),
                      # each generation actor's peak (by process), in the order they started
                      "actor_peaks_mib": [round(max(s["actor_mib"].get(pid, 0) for s in inside))
                                          for pid in sorted({pid for s in inside for pid in s["actor_mib"]})],
                      "actors": max(len(s["actor_mib"]) for s in inside),
                      "store_peak_mib": max(s.get("store_mib") or 0 for s in inside),
                      "data_files": inside[-1]["data_files"], "checkpoint_files": inside[-1]["checkpoint_files"]})
        prev_t, prev_rows = t, rows
    return table


def check_output(output: Path, n: int) -> dict[str, int]:
    """Ids lost and duplicated over the whole output: each built-in prompt's rank k once, 0..N-1."""
    table = pads.dataset(str(output), format="parquet").to_table(columns=["id", "source"])
    ranks = pc.cast(pc.struct_field(pc.extract_regex(table["source"], r"builtin prompt (?P<k>\d+) "), "k"), "int64")
    distinct = pc.unique(ranks)
    in_range = pc.sum(pc.and_(pc.greater_equal(distinct, 0), pc.less(distinct, n))).as_py()
    return {"rows": table.num_rows, "distinct_ids": pc.count_distinct(table["id"]).as_py(),
            "duplicated": table.num_rows - len(distinct), "lost": n - in_range}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1_000_000)
    ap.add_argument("--gen_length", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--kill_at", type=float, default=0.5)
    ap.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--out", default=None, help="directory for the output and scale.json (default: a temporary one)")
    args = ap.parse_args()
    tmp = Path(args.out or tempfile.mkdtemp(prefix="bench_scale_"))
    tmp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    checkpoint = save_inference(Denoiser(ModelConfig(preset="tiny")).eval(), {"kind": "byte"}, tmp / "ckpt")
    init_ray(include_dashboard=False)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    n, output = args.prompts, tmp / "out"
    job = [f"--checkpoint={checkpoint}", f"--input=builtin:{n}", f"--output={output}", "--progress_bars=false",
           f"--batch_size={args.batch_size}", f"--sample.gen_length={args.gen_length}",
           f"--sample.steps={args.steps}", f"--sample.block_length={args.gen_length}"]
    watch = Watch(output)
    first = run_job(job, env, watch, n, args.kill_at, args.every, tmp / "first.log")
    second = run_job(job, env, watch, n, None, args.every, tmp / "resumed.log")
    gaps = [(first["started"], first["first_commit"]), (first["killed"], second["first_commit"])]
    table = tenths(watch.samples, n, gaps)
    final = check_output(output, n)
    resumed = second["summary"]
    report = {"prompts": n, "gen_length": args.gen_length, "steps": args.steps, "batch_size": args.batch_size,
              "first": first, "resumed": {k: v for k, v in second.items() if k != "summary"}, "summary": resumed,
              "tenths": table, "check": final, "samples": watch.samples}
    (tmp / "scale.json").write_text(json.dumps(report, indent=2))

    print(f"\n{n} built-in prompts, random tiny model, gen_length {args.gen_length}, steps {args.steps}, "
          f"batch {args.batch_size}; killed at {first['rows_at_kill']} rows and resumed\n")
    print("| tenth | rows/s | seconds | driver peak MiB | each actor's peak MiB | actors | object store peak MiB "
          "| data files | checkpoint files |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in table:
        peaks = " / ".join(map(str, r["actor_peaks_mib"]))
        print(f"| {r['tenth']} | {r['rows_per_s']} | {r['seconds']} | {r['driver_peak_mib']} | {peaks} "
              f"| {r['actors']} | {r['store_peak_mib']} | {r['data_files']} | {r['checkpoint_files']} |")
    fresh_start = first["first_commit"] - first["started"]
    resume_start = second["first_commit"] - second["started"]
    print(f"\nfirst job: start-up {fresh_start:.1f} s to its first committed file")
    print(f"resumed job ({resumed['rows_done_before']} ids done): start-up {resume_start:.1f} s to its first committed "
          f"file; {resumed['rows_this_run']} rows at {resumed['prompts_per_s']} rows/s over its whole run "
          f"({resumed['seconds']} s, summary included)")
    ratio = table[-1]["rows_per_s"] / table[0]["rows_per_s"] if table[0]["rows_per_s"] and table[-1]["rows_per_s"] else None
    print(f"last tenth / first tenth rows/s: {ratio}; "
          f"driver peak MiB tenth 1 → 10: {table[0]['driver_peak_mib']} → {table[-1]['driver_peak_mib']}")
    print(f"whole output: {final['rows']} rows, {final['distinct_ids']} distinct ids, {final['lost']} lost, "
          f"{final['duplicated']} duplicated; written to {tmp}")


if __name__ == "__main__":
    main()
