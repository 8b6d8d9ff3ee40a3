"""Runs on object storage: a real S3-compatible server (moto's server mode) on localhost.

Pretraining writes everything under ``s3://bucket/runs/<run>`` (checkpoints, export, metrics,
summary, loss curve) and nothing to a local ``s3:`` folder; batch generation reads the export from
the bucket and writes its output there; Serve loads the model from the bucket and answers.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def own_ray(tmp_path_factory):
    """An S3 server, and a local Ray whose every process sees its endpoint and test credentials."""
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bucket")
    ray.shutdown()  # the session's Ray does not know the endpoint
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": env})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _bucket_files(prefix: str) -> set[str]:
    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(prefix)
    return {e.path[len(root) + 1:] for e in filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
            if e.type == pafs.FileType.File}


def test_pretrain_export_generate_and_serve_through_the_bucket(own_ray, tmp_path, monkeypatch):
    import httpx
    from ray import serve

    from dlm_ray.serving.batch import run
    from dlm_ray.config.inference import GenerateConfig
    from dlm_ray.serving.app import build_app

    pretrain = runpy.run_path(str(ROOT / "jobs" / "pretrain.py"))["main"]
    monkeypatch.chdir(tmp_path)  # a local "s3:" folder would appear here
    t0 = time.perf_counter()
    summary = pretrain([
        "--run_name=s3run", "--storage_path=s3://bucket/runs",
        "--model.d_model=64", "--model.n_layers=2", "--model.d_mlp=128", "--model.max_seq_len=64",
        "--data.seq_len=32", "--data.builtin_docs=2000", "--data.builtin_shards=2",
        "--train.batch_size=16", "--train.max_steps=6", "--train.log_every=2", "--train.eval_every=6",
        "--train.eval_batches=1", "--train.checkpoint_every=6", "--train.max_failures=0", "--train.tensorboard=true",
        "--eval.nelbo_samples=2", "--eval.num_nelbo_docs=16", "--eval.num_prompts_per_family=4",
    ])
    pretrain_s = time.perf_counter() - t0
    assert not list(Path(tmp_path).glob("s3*")), "something was written to a local s3: path"
    files = _bucket_files("s3://bucket/runs/s3run")
    for name in ("export/model.safetensors", "export/config.json", "summary.json", "metrics.jsonl", "loss_curve.png"):
        assert name in files, (name, sorted(files))
    assert any(f.startswith("checkpoint_") and f.endswith("trainer_state.json") for f in files)
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    assert summary["export"] == "s3://bucket/runs/s3run/export" and summary["steps"] == 6

    t0 = time.perf_counter()
    gen = run(GenerateConfig(checkpoint=summary["export"], input="builtin:24", output="s3://bucket/gen",
                             actors=(1, 1), cpus_per_actor=0.5, batch_size=8, progress_bars=False))
    generate_s = time.perf_counter() - t0
    assert gen["rows"] == gen["unique_ids"] == 24 and gen["rows_errored"] == 0
    assert "_summary.json" in _bucket_files("s3://bucket/gen")

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    try:
        serve.run(build_app({"checkpoint": summary["export"], "num_cpus": 0.5,
                             "autoscaling": {"min_replicas": 1, "max_replicas": 1}}), name="s3app")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "dlm-tiny", "prompt": "s31=", "max_tokens": 8, "seed": 1})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        serve.shutdown()
    serve_s = time.perf_counter() - t0
    print(json.dumps({"pretrain_s": round(pretrain_s, 1), "generate_s": round(generate_s, 1),
                      "serve_s": round(serve_s, 1)}))
