"""Step times around a checkpoint, with uploads to object storage synchronous (before) and in the
background (after), in one run on the same machine.

    python benchmarks/checkpoint_upload.py [--delay 5] [--steps 40] [--every 10]

A local S3 server (moto's server mode, the one the tests use) is the run's ``storage_path``, and
every upload first sleeps ``--delay`` seconds (``train.upload_delay_s``), as a slow or distant
object store would. The tiny run trains ``--steps`` steps with a checkpoint every ``--every``, once
with ``train.checkpoint_upload=sync`` and once with ``async``; the step times are the gaps between
consecutive ``metrics.jsonl`` records (``log_every`` 1). Prints, per mode, the median and maximum
step time of the steps right after a checkpoint and of the rest, and the run's wall time.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

from dlm_ray.config.io import load_config
from dlm_ray.config.schema import PretrainConfig
from dlm_ray.io.checkpoint import run_dir
from dlm_ray.train.fit import fit
from dlm_ray.train.metrics import read_metrics


def s3_server() -> dict[str, str]:
    """A local S3 endpoint with a bucket; the environment every Ray process must see."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    return env


def run(mode: str, args: argparse.Namespace, tag: str) -> dict[str, float]:
    cfg = load_config(PretrainConfig, None, [
        f"--run_name=upload-{mode}-{tag}", "--storage_path=s3://bench/runs", "--data.progress_bars=false",
        f"--train.max_steps={args.steps}", f"--train.checkpoint_every={args.every}", "--train.log_every=1",
        "--train.eval_every=100000", f"--train.upload_delay_s={args.delay}", f"--train.checkpoint_upload={mode}",
        "--train.warmup_steps=5"])
    t0 = time.time()
    fit(cfg)
    wall = time.time() - t0
    at = {r["step"]: r["time"] for r in read_metrics(run_dir(cfg)) if "loss" in r}
    gaps = {s: at[s] - at[s - 1] for s in sorted(at) if s - 1 in at}
    after = [g for s, g in gaps.items() if (s - 1) % args.every == 0]
    rest = [g for s, g in gaps.items() if (s - 1) % args.every]
    return {"after_median": statistics.median(after), "after_max": max(after), "rest_median": statistics.median(rest),
            "rest_max": max(rest), "wall": wall, "n_after": len(after)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=5.0, help="seconds each upload sleeps first")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    args = ap.parse_args()
    env = s3_server()
    import ray

    from dlm_ray.runtime import init_ray

    init_ray(include_dashboard=False, runtime_env={"env_vars": env})
    tag = str(int(time.time()))
    rows = {mode: run(mode, args, tag) for mode in ("sync", "async")}
    ray.shutdown()
    print(f"\ntiny run, {args.steps} steps, a checkpoint every {args.every} to a local S3 server, each upload "
          f"delayed {args.delay:g} s; step time = gap between consecutive metrics records\n")
    print("| upload | step after a checkpoint: median s | max s | other steps: median s | max s | run wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, r in rows.items():
        print(f"| {mode} | {r['after_median']:.2f} | {r['after_max']:.2f} | {r['rest_median']:.3f} | "
              f"{r['rest_max']:.3f} | {r['wall']:.0f} |")
    print(f"({rows['sync']['n_after']} steps after a checkpoint per run; the last checkpoint's upload is waited for "
          f"at the end of either run.) The runs live in the S3 server's memory and end with it.")


if __name__ == "__main__":
    main()
