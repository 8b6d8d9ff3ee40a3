"""jobs/compare.py at a reduced size: three objectives trained on equal terms by the pretraining job,
each measured by the same code, the table written as JSON and a PNG."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest

from dlm_ray.eval.compare import objective_config
from dlm_ray.config.schema import PretrainConfig
from dlm_ray.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_compare_trains_every_objective_alike_and_writes_the_table(ray_cluster, tmp_path, capsys):
    main = runpy.run_path(str(ROOT / "jobs" / "compare.py"))["main"]
    runs = tmp_path / "runs"
    summary = main([
        "--run_name=cmp", f"--storage_path={runs}", "--model.d_model=64", "--model.n_layers=2", "--model.d_mlp=128",
        "--model.max_seq_len=64", "--data.seq_len=32", "--data.builtin_docs=3000", "--data.builtin_shards=2",
        "--data.conditional_fraction=0.5", "--train.batch_size=16", "--train.max_steps=20", "--train.lr=3e-3",
        "--train.warmup_steps=2", "--train.log_every=5", "--train.eval_every=20", "--train.eval_batches=2",
        "--train.checkpoint_every=20", "--train.max_failures=0", "--eval.nelbo_samples=2",
        "--eval.num_prompts_per_family=6", "--block_size=4", "--gen_batch=16",
    ])
    rows = {(r["objective"], r["sampler"]): r for r in summary["rows"]}
    assert set(rows) == {("diffusion", "reference"), ("diffusion", "threshold 0.9"), ("block", "reference"),
                         ("block", "threshold 0.9"), ("autoregressive", "greedy")}
    for r in rows.values():
        # Held-out bits below a uniform guess over the byte vocabulary: each objective learned something.
        assert 0 < r["heldout_bits"] < np.log2(258) and r["train_tokens_per_s"] > 0 and r["gen_tokens_per_s"] > 0
        assert set(r["validity"]) == {"reverse", "sort", "sudoku"}
        assert all(0 <= v <= 1 for v in r["validity"].values())
    # The answer is at most 24 tokens (the eval length): one call per token at most for the reference
    # and the autoregressive model, no more than the reference with the threshold.
    assert rows[("autoregressive", "greedy")]["calls_per_answer"] <= 24
    assert rows[("diffusion", "threshold 0.9")]["calls_per_answer"] <= rows[("diffusion", "reference")]["calls_per_answer"]
    # Equal terms: every objective's run saw the same steps and tokens.
    seen = set()
    for objective in ("diffusion", "block", "autoregressive"):
        history = read_metrics(str(runs / f"cmp-{objective}"))
        seen.add(max(h["tokens_seen"] for h in history if "tokens_seen" in h))
    assert len(seen) == 1
    out = runs / "cmp-compare"
    written = json.loads((out / "compare.json").read_text())
    assert written["rows"] == summary["rows"] and (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "autoregressive  greedy" in printed and "bits/token" in printed


def test_an_objective_changes_the_model_kind_and_nothing_else():
    cfg = PretrainConfig()
    ar = objective_config(cfg, "autoregressive", block_size=4)
    block = objective_config(cfg, "block", block_size=8)
    assert (ar.model.attention, block.model.attention, block.model.block_size) == ("causal", "block_causal", 8)
    assert ar.run_name == "tiny-autoregressive"
    for other in (ar, block):
        assert other.train == cfg.train and other.data == cfg.data and other.diffusion == cfg.diffusion
        assert other.model.model_dump(exclude={"attention", "block_size", "preset"}) == \
            cfg.model.model_dump(exclude={"attention", "block_size", "preset"})
    with pytest.raises(ValueError, match="unknown objective 'gpt'"):
        objective_config(cfg, "gpt", block_size=4)
