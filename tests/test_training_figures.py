"""What training reports and accepts, without Ray: FLOPs behind MFU, the logged loss's unit, the
paths a config hands to workers, and settings refused by name."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dlm_ray.config.schema import DataConfig, DiffusionConfig, PretrainConfig
from dlm_ray.core.diffusion import diffusion_loss, mask_rows
from dlm_ray.core.model import Denoiser
from dlm_ray.train.fit import training_flops_per_token
from dlm_ray.train.trainer import _per_maskable

L = 32
TRAIN_PACKAGE = Path(__file__).resolve().parents[1] / "dlm_ray" / "train"
MAX_FUNCTION_LINES = 60


def _measured_training_flops(cfg: PretrainConfig) -> float:
    """Forward + backward FLOPs of one training row, as torch counts them."""
    model = Denoiser(cfg.model)
    x0 = torch.randint(0, 200, (1, L))
    extra = {"clean_ids": x0} if cfg.model.attention == "block_causal" else {}
    with FlopCounterMode(display=False) as counter:
        model(x0, torch.ones_like(x0), **extra).sum().backward()
    return counter.get_total_flops()


def test_mfu_counts_what_block_diffusion_runs(tiny_cfg):
    """A block-diffusion row runs its noisy and clean copies through the model: about twice the work
    of a full-attention row, and the FLOPs behind MFU must say so."""
    full = PretrainConfig(model=tiny_cfg, data=DataConfig(seq_len=L))
    block = PretrainConfig(model=tiny_cfg.model_copy(update={"attention": "block_causal", "block_size": 4}),
                           data=DataConfig(seq_len=L))
    measured = _measured_training_flops(block) / _measured_training_flops(full)
    reported = training_flops_per_token(block) / training_flops_per_token(full)
    assert measured > 1.8
    assert reported == pytest.approx(measured, rel=0.15)


def test_logged_loss_is_per_maskable_token():
    """With conditional pretraining a row's prompt is real but never masked: the logged figure is the
    bound over the tokens that can be masked, not diluted by the prompt."""
    rng = np.random.default_rng(0)
    R = 8
    x0 = rng.integers(10, 200, (R, L)).astype(np.int32)
    given = np.zeros((R, L), dtype=np.int8)
    given[:4, :10] = 1  # half the rows keep a 10-token prompt
    rows = {"input_ids": x0, "attention_mask": np.ones((R, L), dtype=np.int8), "given": given,
            "epoch": np.zeros(R, dtype=np.int32), "row_id": np.arange(R), "row_index": np.arange(R)}
    masked = mask_rows(rows, DiffusionConfig(), seed=0, mask_id=250)
    assert masked["num_maskable"].tolist() == [L - 10] * 4 + [L] * 4
    batch = {k: torch.as_tensor(v) for k, v in masked.items() if k != "given"}
    logits = torch.randn(R, L, 256)
    objective = diffusion_loss(logits, batch["input_ids"].long(), batch["loss_mask"], batch["p_mask"],
                               int(batch["attention_mask"].sum()), mask_id=250)
    per_maskable = diffusion_loss(logits, batch["input_ids"].long(), batch["loss_mask"], batch["p_mask"],
                                  int(batch["num_maskable"].sum()), mask_id=250)
    assert float(objective) * _per_maskable(batch) == pytest.approx(float(per_maskable), rel=1e-6)
    assert float(per_maskable) > float(objective)


def test_workers_get_absolute_paths(tmp_path, monkeypatch):
    """Ray Train workers run in their own directories: a relative path must be resolved once, where
    the user typed it."""
    monkeypatch.chdir(tmp_path)
    cfg = PretrainConfig(init_from="exports/a", tokenizer="tok/tokenizer.json").with_absolute_paths()
    assert cfg.storage_path == os.path.join(str(tmp_path), "runs")
    assert cfg.init_from == os.path.join(str(tmp_path), "exports", "a")
    assert cfg.tokenizer == os.path.join(str(tmp_path), "tok", "tokenizer.json")
    remote = PretrainConfig(storage_path="s3://bucket/runs").with_absolute_paths()
    assert remote.storage_path == "s3://bucket/runs" and remote.tokenizer == "byte"


def test_settings_nothing_reads_are_refused():
    with pytest.raises(ValueError, match="document_ids"):
        DataConfig(document_ids=True)  # packing's document numbers are for inspection, not a training setting
    with pytest.raises(ValueError, match="shuffle_window"):
        DataConfig(shuffle="rows", shuffle_window=1)


def test_training_code_is_small_named_steps():
    """The training loop reads as small named steps: no function or method in ``dlm_ray/train``
    runs past ~60 lines (the docstring included), so no loop hides its setup, logging, evaluation and
    checkpointing in one body."""
    lengths = {}
    for path in sorted(TRAIN_PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.name}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
    assert any(name.endswith(" fit") for name in lengths)  # the files were read
    too_long = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES}
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_the_fault_drill_fires_on_object_storage():
    """``fail_once_at_step`` on a run kept in object storage (pyarrow's in-memory filesystem here)
    raises as it does locally; it was silently skipped for any URI."""
    from dlm_ray.train.trainer import InjectedFault, _fail_once

    cfg = PretrainConfig(storage_path="mock:///runs", run_name="drill", train={"fail_once_at_step": 3})
    with pytest.raises(InjectedFault, match="after step 3"):
        _fail_once(cfg, rank=0)
