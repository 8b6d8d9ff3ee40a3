"""Pretraining end to end on a local Ray: real DeepSpeed on CPU (gloo), ZeRO 1/2/3, resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dlm_ray.io.checkpoint import CheckpointError, export, latest_checkpoint, load_inference, run_dir
from dlm_ray.config.schema import PretrainConfig
from dlm_ray.config.io import ConfigError, load_config
from dlm_ray.train.metrics import read_metrics, write_summary
from dlm_ray.train.fit import fit


def tiny_run(tmp_path: Path, name: str, *overrides: str) -> PretrainConfig:
    """A few-second run: a 2-layer model, short rows, a small built-in corpus."""
    return load_config(PretrainConfig, None, [
        f"--run_name={name}", f"--storage_path={tmp_path / 'runs'}",
        "--model.d_model=64", "--model.n_layers=2", "--model.d_mlp=128", "--model.max_seq_len=64",
        "--data.seq_len=32", "--data.builtin_docs=3000", "--data.builtin_shards=2", "--data.tokenizer_actors=[1, 1]",
        "--data.conditional_fraction=0",  # plain documents: the loss curve these tests read is steadier
        "--train.batch_size=16", "--train.max_steps=20", "--train.lr=3e-3", "--train.warmup_steps=2",
        "--train.log_every=1", "--train.eval_every=10", "--train.eval_batches=2", "--train.checkpoint_every=10",
        "--train.max_failures=0", "--eval.nelbo_samples=2", *overrides,
    ])


def losses(cfg: PretrainConfig) -> dict[int, float]:
    """Training loss by step, from the run's metrics.jsonl."""
    return {h["step"]: h["loss"] for h in read_metrics(run_dir(cfg)) if "loss" in h}


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_train_and_export(ray_cluster, tmp_path, stage):
    cfg = tiny_run(tmp_path, f"zero{stage}", f"--train.zero_stage={stage}")
    result = fit(cfg)
    curve = losses(cfg)
    assert sorted(curve) == list(range(1, 21))
    assert np.mean([curve[s] for s in range(16, 21)]) < 0.8 * np.mean([curve[s] for s in range(1, 6)])
    history = read_metrics(run_dir(cfg))
    vals = [h["val_nelbo_bits"] for h in history if "val_nelbo_bits" in h]
    assert len(vals) == 2 and all(np.isfinite(vals))
    for h in history:
        # No MFU on a CPU without a configured peak: a made-up peak would make a made-up figure.
        assert h["tokens_per_s"] > 0 and h["mfu"] is None and h["lr"] > 0 and np.isfinite(h["grad_norm"])
        assert 0 <= h["data_wait_frac"] < 1
    # A report carries this window's metrics only, not the history: its size does not grow with the run.
    assert "history" not in result.metrics and len(json.dumps(result.metrics)) < 1000
    # Export consolidates every rank's shard (ZeRO-3 too) into weights that load and run.
    with result.checkpoint.as_directory() as ckpt:
        out = export(ckpt, tmp_path / "export")
    model, tok, meta = load_inference(out)
    assert meta["source"]["step"] == 20 and meta["model"]["d_model"] == 64
    logits = model(torch.randint(0, 256, (2, 16)))
    assert torch.isfinite(logits).all()


def test_embedding_diffusion_trains_under_zero3_and_round_trips_through_export(ray_cluster, tmp_path):
    """The model reads its embedding table inside its own modules' calls (the noise, the estimate), so
    ZeRO-3's partitioned parameters are gathered where they are read."""
    from dlm_ray.core.kinds import EmbeddingDiffusion, kind_of
    from dlm_ray.core.sampling import generate
    from dlm_ray.config.schema import SampleConfig

    cfg = tiny_run(tmp_path, "emb", "--model.noise=gaussian", "--train.zero_stage=3", "--data.conditional_fraction=0.5")
    result = fit(cfg)
    curve = losses(cfg)
    assert sorted(curve) == list(range(1, 21))
    assert np.mean([curve[s] for s in range(16, 21)]) < 0.8 * np.mean([curve[s] for s in range(1, 6)])
    vals = [h["val_nelbo_bits"] for h in read_metrics(run_dir(cfg)) if "val_nelbo_bits" in h]
    assert len(vals) == 2 and all(np.isfinite(vals)) and all(v > 0 for v in vals)
    with result.checkpoint.as_directory() as ckpt:
        out = export(ckpt, tmp_path / "export")
    config = json.loads((Path(out) / "config.json").read_text())
    assert (config["model_type"], config["noise"]) == ("dlm_ray_embedding_diffusion", "gaussian")
    model, tok, meta = load_inference(out)
    assert isinstance(kind_of(model.config), EmbeddingDiffusion) and meta["source"]["step"] == 20
    assert "noise_in.self_cond.weight" in dict(model.named_parameters())
    ids = generate(model, torch.tensor([[tok.eos_id, *tok.encode("s31=")]]), SampleConfig(gen_length=8, steps=4,
                   block_length=8), mask_id=tok.mask_id, generator=[torch.Generator().manual_seed(0)])
    assert ids.shape == (1, 13) and (ids[0, 5:] != tok.mask_id).all()


def test_resume_continues_at_the_right_step(ray_cluster, tmp_path):
    straight = tiny_run(tmp_path, "straight")
    fit(straight)
    reference = losses(straight)
    # The same run, stopped by a fault right after its step-10 checkpoint (no restarts allowed) ...
    cfg = tiny_run(tmp_path, "interrupted", "--train.fail_once_at_step=12")
    with pytest.raises(Exception, match="injected fault"):
        fit(cfg)
    ckpt, state = latest_checkpoint(cfg)
    assert state["step"] == 10 and state["position"][0] == 0 and state["position"][2] > 0
    assert max(losses(cfg)) == 12  # logged before the fault, past the checkpoint
    # ... then rerun with the same name: it resumes from step 10 and repeats or skips no step;
    # metrics.jsonl drops the two steps logged after the checkpoint and logs them again.
    fit(cfg)
    resumed = losses(cfg)
    assert [h["step"] for h in read_metrics(run_dir(cfg)) if "loss" in h] == list(range(1, 21))
    assert sorted(resumed) == list(range(1, 21))
    assert all(resumed[s] == pytest.approx(reference[s], rel=1e-4) for s in range(1, 11))
    after = [abs(resumed[s] - reference[s]) / reference[s] for s in range(11, 21)]
    print(f"resumed vs uninterrupted, steps 11-20: max relative loss difference {max(after):.2e}")
    assert max(after) < 0.02, after  # same weights, optimizer state, data position and masks


def test_worker_failure_restarts_from_checkpoint(ray_cluster, tmp_path):
    cfg = tiny_run(tmp_path, "restart", "--train.fail_once_at_step=15", "--train.max_failures=1")
    result = fit(cfg)
    assert result.metrics["step"] == 20 and sorted(losses(cfg)) == list(range(1, 21))
    markers = list(Path(run_dir(cfg)).glob(".fault_injected_rank*"))
    assert len(markers) >= 1  # the fault really happened


def test_bad_settings_fail_before_any_worker(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.zero_stag"):
        load_config(PretrainConfig, None, ["--train.zero_stag=2"])
    with pytest.raises(ConfigError, match=r"train\.zero_stage"):
        load_config(PretrainConfig, None, ["--train.zero_stage=4"])
    with pytest.raises(ConfigError, match="not divisible by num_workers x grad_accum"):
        load_config(PretrainConfig, None, ["--train.batch_size=63"])
    cfg = tiny_run(tmp_path, "broken")
    bad = Path(run_dir(cfg)) / "checkpoint_2026-01-01_00-00-00.000000"
    bad.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        fit(cfg)  # no Ray needed: refused before the trainer starts
    (bad / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        latest_checkpoint(cfg)


def _has_colour(png: Path, rgb: str) -> bool:
    """Whether the image has pixels of this colour (a plotted line), not just axes and text."""
    import matplotlib.image

    pixels = (matplotlib.image.imread(str(png))[..., :3] * 255).round()
    want = np.array([int(rgb[i:i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(pixels - want).sum(-1) < 30).any())


def test_summary_curve_and_tensorboard_from_metrics(ray_cluster, tmp_path, monkeypatch):
    """The default storage path is relative (``runs``): the metrics, the TensorBoard events, the
    curve and the summary land under it, where the run was started, not in the workers' directories."""
    monkeypatch.chdir(tmp_path)
    cfg = tiny_run(tmp_path, "summary", "--storage_path=runs", "--train.max_steps=4", "--train.eval_every=4",
                   "--train.tensorboard=true")
    assert cfg.storage_path == "runs"
    fit(cfg)
    here = tmp_path / "runs" / "summary"
    assert run_dir(cfg) == str(here)
    summary = write_summary(run_dir(cfg), {"steps": 4})
    written = json.loads((here / "summary.json").read_text())
    history = read_metrics(str(here))
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    assert written["final_loss"] == history[-1]["loss"] and written["final_val_nelbo_bits"] == history[-1]["val_nelbo_bits"]
    assert written["final_loss"] is not None and summary["steps"] == 4 and "history" not in written
    assert (here / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert _has_colour(here / "loss_curve.png", "#1f77b4") and _has_colour(here / "loss_curve.png", "#ff7f0e")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(here / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([h["loss"] for h in history if "loss" in h])


def test_data_running_out_stops_with_a_reason_and_a_last_checkpoint(ray_cluster, tmp_path):
    """A corpus smaller than max_steps asks for: training says why it stopped and checkpoints its last
    step; a held-out split smaller than one micro-batch per worker is still scored, not read as 0."""
    cfg = tiny_run(tmp_path, "short", "--data.builtin_docs=300", "--train.batch_size=32", "--train.max_epochs=2",
                   "--train.max_steps=100", "--train.checkpoint_every=100", "--train.eval_every=100")
    result = fit(cfg)
    steps = [h["step"] for h in read_metrics(run_dir(cfg)) if "loss" in h]
    last = max(steps)
    assert 0 < last < 100 and result.metrics["stop_reason"] == "data_exhausted"
    assert result.metrics["step"] == last and latest_checkpoint(cfg)[1]["step"] == last
    final = [h for h in read_metrics(run_dir(cfg)) if "val_nelbo_bits" in h]
    assert final[-1]["step"] == last and 1.0 < final[-1]["val_nelbo_bits"] < 12.0
