"""Checkpoint copies on one node: two generation actors and one Serve replica loading an s3:// export.

    python benchmarks/checkpoint_copies.py [--before REV]

Starts a local S3 server (moto), writes a tiny export to ``s3://bench/export``, then, once with
the dlm_ray of ``REV`` (extracted with ``git archive``; default: the commit before the node cache)
and once with this tree, runs in a fresh process on a fresh local Ray: a batch-generation job with
two actors (its driver reads the settings and the checkpoint's hash) and a Serve app with one
replica, all loading the export from the bucket. Each version gets its own ``TMPDIR`` and
``DLM_RAY_CACHE_DIR``; afterwards every local directory under them holding a ``*.safetensors``
file is a copy of the weights. Prints the copies and their bytes for both. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
URI = "s3://bench/export"
PASSED = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION",
          "TMPDIR", "DLM_RAY_CACHE_DIR", "PYTHONPATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copies(*roots: Path) -> list[tuple[str, int]]:
    """(directory, bytes) of every local directory holding weights under ``roots``."""
    dirs = sorted({p.parent for r in roots for p in r.rglob("*.safetensors")})
    return [(str(d), sum(f.stat().st_size for f in d.rglob("*") if f.is_file())) for d in dirs]


def measure() -> None:
    """In a fresh process (the version under test on PYTHONPATH): generate and serve, then count."""
    import ray
    from ray import serve

    import dlm_ray
    from dlm_ray.config.schema import SampleConfig
    from dlm_ray.config.inference import GenerateConfig
    from dlm_ray.serving.batch import run
    from dlm_ray.serving.app import build_app

    tmp, cache = Path(os.environ["TMPDIR"]), Path(os.environ["DLM_RAY_CACHE_DIR"])
    env = {k: os.environ[k] for k in PASSED if k in os.environ}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": env})
    run(GenerateConfig(checkpoint=URI, input="builtin:16", output=str(tmp / "generations"), actors=(2, 2),
                       cpus_per_actor=0.5, batch_size=4, progress_bars=False,
                       sample=SampleConfig(gen_length=8, steps=8, block_length=8)))
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    serve.run(build_app({"checkpoint": URI, "num_cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}),
              name="copies")
    serve.shutdown()
    workers = ray.get(ray.remote(lambda: __import__("dlm_ray").__file__).remote())  # which version Ray ran
    ray.shutdown()
    print(json.dumps({"package": str(Path(dlm_ray.__file__).parent), "workers": workers,
                      "copies": copies(tmp, cache)}))


def before_rev() -> str:
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "dlm_ray/io/storage.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    if not added:
        raise SystemExit("no commit adds dlm_ray/io/storage.py: pass --before REV")
    return added[-1] + "^"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None, help="the revision measured as BEFORE (default: before the cache)")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return measure()

    import boto3
    import torch
    from moto.server import ThreadedMotoServer

    from dlm_ray.io.checkpoint import save_inference
    from dlm_ray.config.schema import ModelConfig
    from dlm_ray.core.model import Denoiser

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the S3 server's request log
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1"})
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    torch.manual_seed(0)
    save_inference(Denoiser(ModelConfig(preset="tiny")).eval(), {"kind": "byte"}, URI)
    rev = args.before or before_rev()
    work = Path(tempfile.mkdtemp(prefix="ckc"))  # short: Ray puts its sockets under TMPDIR
    old = work / "before"
    old.mkdir()
    archive = subprocess.run(["git", "archive", rev, "dlm_ray"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    results = {}
    try:
        for name, pythonpath in (("before", str(old)), ("after", str(ROOT))):
            tmp = work / name
            (tmp / "t").mkdir(parents=True)
            env = {**os.environ, "TMPDIR": str(tmp / "t"), "DLM_RAY_CACHE_DIR": str(tmp / "cache"),
                   "PYTHONPATH": pythonpath}
            # Run from outside the repository: Ray puts the driver's directory on its workers' sys.path.
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure"], env=env, cwd=tmp,
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"\ntwo generation actors + the generation driver + one Serve replica on one node, loading {URI}\n"
          f"before = {rev} ({short.strip()}), after = this tree\n")
    print("| code | weight copies | bytes copied | where |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        where = [str(Path(d).relative_to(work / name)) for d, _ in r["copies"]]
        print(f"| {name} | {len(r['copies'])} | {sum(b for _, b in r['copies'])} | {', '.join(where)} |")
    for name, r in results.items():
        print(f"{name}: driver ran {r['package']}, Ray workers ran {Path(r['workers']).parent}")


if __name__ == "__main__":
    main()
