"""Checkpoints and evaluation off the training path: background uploads that the next step does not
wait for, failed uploads retried, reported and resumed from the last committed checkpoint, and each
checkpoint evaluated by a Ray task of its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dlm_ray.config.schema import PretrainConfig
from dlm_ray.eval.checkpoints import evaluate_checkpoint
from dlm_ray.io.checkpoint import RAY_SNAPSHOT_FILE, STATE_FILE, latest_checkpoint, run_dir
from dlm_ray.train.fit import fit
from dlm_ray.train.metrics import read_metrics
from dlm_ray.train.upload import UploadFailed, upload_checkpoint
from dlm_ray.io.evaluations import EVAL_DIR
from tests.test_train import tiny_run


def test_an_upload_is_retried_and_every_failure_reported(capsys):
    cfg = PretrainConfig(train={"upload_attempts": 3})
    calls = []

    def flaky(checkpoint, name):
        calls.append(name)
        if len(calls) < 3:
            raise OSError(f"503 Slow Down ({len(calls)})")
        return f"stored {checkpoint} at {name}"

    assert upload_checkpoint("ckpt", "checkpoint_a", cfg=cfg, step=7, rank=1, persist=flaky,
                             backoff_s=0.01) == "stored ckpt at checkpoint_a"
    out = capsys.readouterr().out
    assert "upload of step 7 (rank 1) failed, try 1 of 3: OSError: 503 Slow Down (1); trying again" in out
    assert "try 2 of 3" in out and "try 3" not in out

    def down(checkpoint, name):
        raise OSError("connection refused")

    with pytest.raises(UploadFailed, match="step 7 could not be uploaded to checkpoint_b after 3 tries"):
        upload_checkpoint("ckpt", "checkpoint_b", cfg=cfg, step=7, rank=0, persist=down, backoff_s=0.01)
    assert "try 3 of 3: OSError: connection refused; giving up" in capsys.readouterr().out


def _step_gaps(cfg: PretrainConfig) -> dict[int, float]:
    """Seconds between the record of each step and the one before, from metrics.jsonl."""
    at = {r["step"]: r["time"] for r in read_metrics(run_dir(cfg)) if "loss" in r}
    return {s: at[s] - at[s - 1] for s in sorted(at) if s - 1 in at}


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_delayed_upload_delays_the_next_step_only_when_synchronous(ray_cluster, tmp_path, mode):
    delay = 8.0
    cfg = tiny_run(tmp_path, f"upload-{mode}", "--train.max_steps=12", "--train.checkpoint_every=6",
                   "--train.eval_every=100", f"--train.upload_delay_s={delay}", f"--train.checkpoint_upload={mode}",
                   f"--train.checkpoint_staging={tmp_path / 'staging'}")
    result = fit(cfg)
    gaps = _step_gaps(cfg)
    assert result.metrics["step"] == 12 and sorted(gaps) == list(range(2, 13))
    others = max(g for s, g in gaps.items() if s != 7)
    if mode == "async":
        assert gaps[7] < delay / 2 and others < delay / 2, gaps  # step 7 ran while step 6 uploaded
    else:
        assert gaps[7] >= delay > others, gaps  # the step after the checkpoint waited for its upload
    # Both checkpoints committed, and the staged copies deleted once uploaded.
    ckpt, state = latest_checkpoint(cfg)
    assert state["step"] == 12 and (Path(ckpt) / STATE_FILE).is_file()
    assert list((tmp_path / "staging").iterdir()) == []


def test_a_failed_upload_restarts_the_run_from_the_last_committed_checkpoint(ray_cluster, tmp_path):
    cfg = tiny_run(tmp_path, "upload-fails", "--train.max_steps=15", "--train.checkpoint_every=5",
                   "--train.eval_every=100", "--train.fail_upload_at_step=10", "--train.upload_attempts=2",
                   "--train.max_failures=1", f"--train.checkpoint_staging={tmp_path / 'staging'}")
    result = fit(cfg)
    run = Path(run_dir(cfg))
    assert list(run.glob(".upload_failed_rank*")), "the upload drill did not fail"
    history = read_metrics(run_dir(cfg))
    # The restart picked up at step 5, the last checkpoint whose upload had finished, not at 10.
    assert [r["resumed_from_step"] for r in history if "resumed_from_step" in r] == [5]
    assert [r["step"] for r in history if "loss" in r] == list(range(1, 16))
    assert result.metrics["step"] == 15 and latest_checkpoint(cfg)[1]["step"] == 15
    assert list((tmp_path / "staging").iterdir()) == []  # the failed upload's staged copies too
    # A folder Ray Train never committed (an upload cut off) is never resumed from.
    half = run / "checkpoint_9999-01-01_00-00-00.000000"
    half.mkdir()
    (half / STATE_FILE).write_text(json.dumps({"step": 99, "position": [0, 0, 0]}))
    assert latest_checkpoint(cfg)[1]["step"] == 15
    committed = json.loads((run / RAY_SNAPSHOT_FILE).read_text())["checkpoint_results"]
    assert half.name not in {c["checkpoint_dir_name"] for c in committed}


def test_checkpoints_are_evaluated_by_a_task_of_their_own(ray_cluster, tmp_path):
    cfg = tiny_run(tmp_path, "evaluated", "--eval.on_checkpoints=true", "--eval.cpus=0.5",
                   "--eval.checkpoint_prompts_per_family=2", "--eval.sample.gen_length=8", "--eval.sample.steps=4",
                   "--eval.sample.block_length=8")
    result = fit(cfg, evaluator=evaluate_checkpoint)
    history = read_metrics(run_dir(cfg))
    evaluated = {r["step"]: r for r in history if r.get("evaluated") == "checkpoint"}
    assert sorted(evaluated) == [10, 20]  # each reported checkpoint, at its step
    for r in evaluated.values():
        assert np.isfinite(r["val_nelbo_bits"]) and r["val_nelbo_bits"] > 0 and r["eval_seconds"] > 0
        assert {k for k in r if k.startswith("validity_")} == {f"validity_{f}" for f in cfg.data.corpus.families}
    # The trainers scored nothing themselves.
    assert not [r for r in history if "val_nelbo_bits" in r and r.get("evaluated") != "checkpoint"]
    assert sorted(p.name for p in (Path(run_dir(cfg)) / EVAL_DIR).iterdir()) == \
        ["step_000000010.json", "step_000000020.json"]
    assert result.metrics["step"] == 20
    with pytest.raises(ValueError, match="eval.on_checkpoints needs an evaluator"):
        fit(cfg.model_copy(update={"run_name": "no-evaluator"}))
