"""Exports on object storage and the per-node checkpoint cache, against a real S3-compatible server
(moto's server mode on localhost) and real separate processes (multiprocessing, spawn).

A weight copy is any local directory holding a ``*.safetensors`` file: the cache's entries, or the
per-process temporary copies an earlier version made. The processes' temporary directory and the
cache directory both lie under the test's ``tmp_path``, so every copy is counted.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

from dlm_ray.io.checkpoint import CheckpointError, checkpoint_hash, load_inference, save_inference
from dlm_ray.config.schema import ModelConfig
from dlm_ray.core.model import Denoiser

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")
TINY = ModelConfig(preset="tiny", d_model=64, n_layers=2, n_heads=4, d_mlp=128, max_seq_len=64)


@pytest.fixture(scope="module")
def bucket():
    """``s3://cache-bucket`` on a local S3 server; this process and its children see its endpoint."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1"})
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="cache-bucket")
    try:
        yield "s3://cache-bucket"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def local_dirs(tmp_path, monkeypatch):
    """(temp dir, cache dir) for this process and the processes it spawns."""
    tmp, cache = tmp_path / "tmp", tmp_path / "cache"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("DLM_RAY_CACHE_DIR", str(cache))
    return tmp, cache


def model(seed: int) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(TINY).eval()


def checksum(m: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in m.parameters()))


def weight_copies(*roots: Path) -> list[Path]:
    return sorted({p.parent for root in roots for p in root.rglob("*.safetensors")})


def files_under(uri: str) -> set[str]:
    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(uri)
    return {i.path[len(root) + 1:] for i in filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File}


def test_an_export_on_s3_replaces_the_earlier_one_whole(bucket, local_dirs):
    """A sharded export A, loaded, then a one-file export B at the same URI: loading returns B (not
    A's index, not this node's cached copy of A) and the prefix holds exactly B's files."""
    from pyarrow import fs as pafs

    uri = f"{bucket}/swap/model"
    a, b = model(0), model(1)
    save_inference(a, {"kind": "byte"}, uri, shard_bytes=100_000)
    assert "model.safetensors.index.json" in files_under(uri)
    assert checksum(load_inference(uri)[0]) == checksum(a)
    save_inference(b, {"kind": "byte"}, uri)
    assert files_under(uri) == {"config.json", "model.safetensors"}
    assert checksum(load_inference(uri)[0]) == checksum(b)

    run = f"{bucket}/swap/run"  # a run's prefix, not a model's: an export must not wipe it
    filesystem, root = pafs.FileSystem.from_uri(run)
    with filesystem.open_output_stream(f"{root}/checkpoint_000001/trainer_state.json") as f:
        f.write(b"{}")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_inference(a, {"kind": "byte"}, run)
    assert files_under(run) == {"checkpoint_000001/trainer_state.json"}


def test_checkpoint_hash_of_a_uri_reads_no_weights(bucket, local_dirs):
    a, b = model(0), model(1)
    save_inference(a, {"kind": "byte"}, f"{bucket}/hash/a1")
    save_inference(a, {"kind": "byte"}, f"{bucket}/hash/a2", shard_bytes=100_000)
    save_inference(b, {"kind": "byte"}, f"{bucket}/hash/b")
    local = save_inference(a, {"kind": "byte"}, local_dirs[0].parent / "a_local")
    ha1, ha2, hb = (checkpoint_hash(f"{bucket}/hash/{n}") for n in ("a1", "a2", "b"))
    assert ha1 == ha2 == checkpoint_hash(local) != hb
    assert weight_copies(*local_dirs) == []  # nothing was copied to hash them


def _load(uri: str, start: object, results: object, hold: object) -> None:
    """In a fresh process: load ``uri`` when all start together, report, then stay until told."""
    from dlm_ray.io.checkpoint import load_inference

    start.wait()  # type: ignore[attr-defined]
    loaded, _, _ = load_inference(uri)
    results.put((os.getpid(), checksum(loaded)))  # type: ignore[attr-defined]
    if hold is not None:
        hold.wait(60)  # type: ignore[attr-defined]


def _run(uris: list[str], *, hold: object = None) -> tuple[list[float], list]:
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(len(uris)), ctx.Queue()
    procs = [ctx.Process(target=_load, args=(u, start, results, hold)) for u in uris]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    return [s for _, s in sorted(got)], procs


def _join(procs: list) -> None:
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


def test_processes_on_a_node_share_one_copy(bucket, local_dirs):
    """Three processes loading one URI at the same moment: one copy, made by one of them."""
    tmp, cache = local_dirs
    m = model(2)
    uri = f"{bucket}/shared/model"
    save_inference(m, {"kind": "byte"}, uri, shard_bytes=100_000)
    sums, procs = _run([uri] * 3)
    _join(procs)
    assert sums == [checksum(m)] * 3
    copies = weight_copies(tmp, cache)
    assert len(copies) == 1, copies
    assert sorted(p.name for p in copies[0].iterdir()) == sorted(files_under(uri))  # no partial files
    assert list(tmp.iterdir()) == []  # no temporary directories left behind
    assert [p.name for p in cache.iterdir() if p.name != ".locks"] == [copies[0].name]


def test_the_cache_keeps_its_size_limit_without_evicting_what_is_in_use(bucket, local_dirs, monkeypatch):
    tmp, cache = local_dirs
    uris = [f"{bucket}/limit/m{i}" for i in range(3)]
    for i, uri in enumerate(uris):
        save_inference(model(10 + i), {"kind": "byte"}, uri)
    size = sum(p.stat().st_size for p in Path(save_inference(model(10), {"kind": "byte"}, tmp.parent / "m")).iterdir())
    monkeypatch.setenv("DLM_RAY_CACHE_GB", str(1.5 * size / 1e9))  # room for one checkpoint

    # m0 stays in use by a live process while m1 is loaded: both stay, the limit notwithstanding.
    hold = multiprocessing.get_context("spawn").Event()
    _, holder = _run([uris[0]], hold=hold)
    _, procs = _run([uris[1]])
    _join(procs)
    assert len(weight_copies(tmp, cache)) == 2
    hold.set()
    _join(holder)

    # Nothing in use now: loading m2 evicts both, least recently used first, to stay within the limit.
    sums, procs = _run([uris[2]])
    _join(procs)
    assert sums == [checksum(model(12))]
    copies = weight_copies(tmp, cache)
    assert len(copies) == 1 and sum(p.stat().st_size for p in copies[0].rglob("*")) <= 1.5 * size
    assert list(tmp.iterdir()) == []
    assert sorted(p.name for p in (cache / ".locks").iterdir()) == sorted(
        ["cache.lock", f"{copies[0].name}.use", f"{copies[0].name}.write"])
