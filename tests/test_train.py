"""Pretraining end to end on a local Ray: real DeepSpeed on CPU (gloo), ZeRO 1/2/3, resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dlm_ray.checkpoint import CheckpointError, export, load_inference
from dlm_ray.config import ConfigError, PretrainConfig, load_config
from dlm_ray.train import fit, latest_checkpoint, run_dir


def tiny_run(tmp_path: Path, name: str, *overrides: str) -> PretrainConfig:
    """A few-second run: a 2-layer model, short rows, a small built-in corpus."""
    return load_config(PretrainConfig, None, [
        f"--run_name={name}", f"--storage_path={tmp_path / 'runs'}",
        "--model.d_model=64", "--model.n_layers=2", "--model.d_mlp=128", "--model.max_seq_len=64",
        "--data.seq_len=32", "--data.builtin_docs=3000", "--data.builtin_shards=2", "--data.tokenizer_actors=[1, 1]",
        "--train.batch_size=16", "--train.max_steps=20", "--train.lr=3e-3", "--train.warmup_steps=2",
        "--train.log_every=1", "--train.eval_every=10", "--train.eval_batches=2", "--train.checkpoint_every=10",
        "--train.max_failures=0", "--eval.nelbo_samples=2", *overrides,
    ])


def losses(result) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in result.metrics["history"] if "loss" in h}


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_train_and_export(ray_cluster, tmp_path, stage):
    cfg = tiny_run(tmp_path, f"zero{stage}", f"--train.zero_stage={stage}")
    result = fit(cfg)
    curve = losses(result)
    assert sorted(curve) == list(range(1, 21))
    assert np.mean([curve[s] for s in range(16, 21)]) < 0.8 * np.mean([curve[s] for s in range(1, 6)])
    vals = [h["val_nelbo_bits"] for h in result.metrics["history"] if "val_nelbo_bits" in h]
    assert len(vals) == 2 and all(np.isfinite(vals))
    for h in result.metrics["history"]:
        assert h["tokens_per_s"] > 0 and h["mfu"] > 0 and h["lr"] > 0 and np.isfinite(h["grad_norm"])
        assert 0 <= h["data_wait_frac"] < 1
    # Export consolidates every rank's shard (ZeRO-3 too) into weights that load and run.
    with result.checkpoint.as_directory() as ckpt:
        out = export(ckpt, tmp_path / "export")
    model, tok, meta = load_inference(out)
    assert meta["source"]["step"] == 20 and meta["model"]["d_model"] == 64
    logits = model(torch.randint(0, 256, (2, 16)))
    assert torch.isfinite(logits).all()


def test_resume_continues_at_the_right_step(ray_cluster, tmp_path):
    reference = losses(fit(tiny_run(tmp_path, "straight")))
    # The same run, stopped by a fault right after its step-10 checkpoint (no restarts allowed) ...
    cfg = tiny_run(tmp_path, "interrupted", "--train.fail_once_at_step=12")
    with pytest.raises(Exception, match="injected fault"):
        fit(cfg)
    ckpt, state = latest_checkpoint(cfg)
    assert state["step"] == 10
    # ... then rerun with the same name: it resumes from step 10 and repeats or skips no step.
    resumed = losses(fit(cfg))
    assert sorted(resumed) == list(range(1, 21))
    assert all(resumed[s] == pytest.approx(reference[s], rel=1e-4) for s in range(1, 11))
    after = [abs(resumed[s] - reference[s]) / reference[s] for s in range(11, 21)]
    print(f"resumed vs uninterrupted, steps 11-20: max relative loss difference {max(after):.2e}")
    assert max(after) < 0.02, after  # same weights, optimizer state, data position and masks


def test_worker_failure_restarts_from_checkpoint(ray_cluster, tmp_path):
    cfg = tiny_run(tmp_path, "restart", "--train.fail_once_at_step=15", "--train.max_failures=1")
    result = fit(cfg)
    assert result.metrics["step"] == 20 and sorted(losses(result)) == list(range(1, 21))
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


def test_summary_and_curve_written(ray_cluster, tmp_path):
    from dlm_ray.train import write_summary

    cfg = tiny_run(tmp_path, "summary")
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "val_nelbo_bits": 4.0}]
    summary = write_summary(cfg, history, {"steps": 2})
    written = json.loads((Path(run_dir(cfg)) / "summary.json").read_text())
    assert written["final_loss"] == 2.5 and written["final_val_nelbo_bits"] == 4.0 and summary["steps"] == 2
    assert (Path(run_dir(cfg)) / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
