"""Checkpoint formats with the real DeepSpeed engine (one process, gloo): save, resume, export."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from dlm_ray.io.checkpoint import (CheckpointError, checkpoint_hash, export, load_inference, load_training, save_inference,
                                save_training)
from dlm_ray.config.schema import PretrainConfig
from dlm_ray.config.io import load_config
from dlm_ray.core.model import Denoiser
from dlm_ray.train.engine import deepspeed_config


@pytest.fixture(scope="module")
def process_group():
    """One gloo group for the module: DeepSpeed caches its groups, so it is made once."""
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                     "LOCAL_RANK": "0"}.items():
            mp.setenv(k, v)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
    torch.distributed.destroy_process_group()


def engine_for(cfg: PretrainConfig, seed: int = 0):
    import deepspeed

    torch.manual_seed(seed)
    model = Denoiser(cfg.model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(cfg.train, use_gpu=False))
    return engine


def step(engine, x):
    loss = engine(x).logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.mark.parametrize("stage", [2, 3])
def test_save_resume_export_round_trip(process_group, tmp_path, stage):
    cfg = load_config(PretrainConfig, None, ["--model.d_model=64", "--model.n_layers=2", "--model.d_mlp=128",
                                             "--train.num_workers=1", "--train.batch_size=4",
                                             f"--train.zero_stage={stage}"])
    engine = engine_for(cfg)
    x = torch.randint(0, 256, (4, 16))
    for _ in range(3):
        step(engine, x)
    state = {"step": 3, "tokens_seen": 192, "epoch": 0, "batches_into_epoch": 3, "history": []}
    save_training(tmp_path / "ck", engine, rank=0, state=state, cfg=cfg)
    engine.eval()
    with torch.no_grad():
        ref = engine.module(x)
    engine.train()
    next_loss = step(engine, x)

    # Resume: a fresh engine (other initial weights) continues exactly where the saved one was.
    fresh = engine_for(cfg, seed=1)
    assert load_training(tmp_path / "ck", fresh, rank=0) == state
    assert step(fresh, x) == pytest.approx(next_loss, rel=1e-6)

    # Export: consolidated weights reproduce the engine's logits.
    model, tok, meta = load_inference(export(tmp_path / "ck", tmp_path / "export"))
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    assert meta["tokenizer"]["kind"] == "byte" and tok.mask_id == 258 and meta["layout"] == "llada"


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no trainer_state.json"):
        load_training(tmp_path, engine=None, rank=0)
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_inference(tmp_path)
    cfg = load_config(PretrainConfig, None, ["--model.d_model=64", "--model.n_layers=1", "--model.d_mlp=64"])
    out = save_inference(Denoiser(cfg.model), {"kind": "byte"}, tmp_path / "inf")
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        load_inference(out)


# ------------------------------------------------------------------------ exports replace each other


def _small_model(seed: int) -> Denoiser:
    cfg = load_config(PretrainConfig, None, ["--model.d_model=64", "--model.n_layers=2", "--model.d_mlp=128"])
    torch.manual_seed(seed)
    return Denoiser(cfg.model).eval()


def test_an_export_replaces_an_earlier_one_whole(tmp_path):
    """A sharded export A, then a one-file export B into the same directory: B loads, and the
    directory holds exactly B's files (A's index, which a loader prefers, is gone)."""
    a, b = _small_model(0), _small_model(1)
    out = tmp_path / "model"
    save_inference(a, {"kind": "byte"}, out, shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").is_file()
    save_inference(b, {"kind": "byte"}, tmp_path / "b_alone")
    save_inference(b, {"kind": "byte"}, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "b_alone").iterdir())
    loaded, _, _ = load_inference(out)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), b(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b_alone", "model"]  # no staging directory left


def test_a_failed_export_leaves_the_earlier_one_and_a_foreign_directory_is_refused(tmp_path):
    a = _small_model(0)
    out = save_inference(a, {"kind": "byte"}, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        save_inference(_small_model(1), {"kind": "hf", "path": str(tmp_path / "missing")}, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    run = tmp_path / "run"  # a run's directory, not a model's: an export must not wipe it
    (run / "checkpoint_000001").mkdir(parents=True)
    (run / "checkpoint_000001" / "trainer_state.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_inference(a, {"kind": "byte"}, run)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == [
        "checkpoint_000001", "checkpoint_000001/trainer_state.json", "metrics.jsonl"]


def test_checkpoint_hash_names_the_weights_not_their_files(tmp_path):
    """Equal for the same weights (however sharded), different for other weights; read from
    config.json, where the export recorded it."""
    a, b = _small_model(0), _small_model(1)
    save_inference(a, {"kind": "byte"}, tmp_path / "a1")
    save_inference(a, {"kind": "byte"}, tmp_path / "a2", shard_bytes=100_000)
    save_inference(b, {"kind": "byte"}, tmp_path / "b")
    assert checkpoint_hash(tmp_path / "a1") == checkpoint_hash(tmp_path / "a2") != checkpoint_hash(tmp_path / "b")
    config = json.loads((tmp_path / "a1" / "config.json").read_text())
    assert len(config["dlm_ray"]["content_sha256"]) == 64
    with pytest.raises(CheckpointError, match="has no config.json"):
        checkpoint_hash(tmp_path)
