"""jobs/compare.py at a reduced size: four objectives trained on equal terms by the pretraining job,
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
        "--eval.num_prompts_per_family=6", "--block_size=4", "--gen_batches=1,16", "--ode_steps=6",
    ])
    every = {(r["objective"], r["sampler"], r["batch"]): r for r in summary["rows"]}
    names = {k[:2] for k in every}
    assert names == {("diffusion", "reference"), ("diffusion", "threshold 0.9"), ("diffusion", "threshold 0.9, dual"),
                     ("diffusion", "entropy 0.5, dual"), ("diffusion", "entropy 1, dual"), ("block", "reference"),
                     ("block", "threshold 0.9"), ("block", "entropy 0.5"), ("block", "entropy 1"),
                     ("autoregressive", "greedy"), ("embedding", "ode 6 steps"), ("embedding", "ode 24 steps")}
    assert set(every) == {n + (b,) for n in names for b in (1, 16)}
    for (objective, sampler, _), r in every.items():
        # Held-out bits below a uniform guess over the byte vocabulary: each objective learned something.
        # (Embedding diffusion's bound is far looser after 20 steps: it weighs the error of the
        # predicted embedding by the signal-to-noise ratio, up to e^6.)
        if objective != "embedding":
            assert 0 < r["heldout_bits"] < np.log2(258)
        assert np.isfinite(r["heldout_bits"]) and r["heldout_bits"] > 0 and r["train_tokens_per_s"] > 0
        assert r["answers_per_s"] > 0 and r["answer_tokens_per_s"] > 0
        assert r["seconds_per_answer"] == pytest.approx(1 / r["answers_per_s"])
        assert set(r["validity"]) == set(r["tokens_per_call"]) == {"reverse", "sort", "sudoku"}
        assert all(0 <= v <= 1 for v in r["validity"].values())
        # A row's answer does not depend on the rows batched with it: the same validity at every batch.
        assert r["validity"] == every[(objective, sampler, 1)]["validity"]
    rows = {k[:2]: r for k, r in every.items() if k[2] == 16}
    # The answer is at most 24 tokens (the eval length): one call per token at most for the reference
    # and the autoregressive model (which commits one token per call, EOS included, on each row still
    # at work), no more than the reference with the threshold.
    assert rows[("autoregressive", "greedy")]["calls_per_answer"] <= 24
    assert all(v <= 1 for v in rows[("autoregressive", "greedy")]["tokens_per_call"].values())
    alone = every[("autoregressive", "greedy", 1)]["tokens_per_call"]
    assert all(v == pytest.approx(1.0) for v in alone.values())
    assert rows[("diffusion", "threshold 0.9")]["calls_per_answer"] <= rows[("diffusion", "reference")]["calls_per_answer"]
    # The ODE makes exactly its steps' calls, whatever the answer.
    assert rows[("embedding", "ode 6 steps")]["calls_per_answer"] == 6
    assert rows[("embedding", "ode 24 steps")]["calls_per_answer"] == 24
    # Equal terms: every objective's run saw the same steps and tokens.
    seen = set()
    for objective in ("diffusion", "block", "autoregressive", "embedding"):
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
    embedding = objective_config(cfg, "embedding", block_size=4)
    assert (ar.model.attention, block.model.attention, block.model.block_size) == ("causal", "block_causal", 8)
    assert (embedding.model.attention, embedding.model.noise) == ("full", "gaussian")
    assert ar.run_name == "tiny-autoregressive" and block.model.noise == ar.model.noise == "mask"
    for other in (ar, block, embedding):
        assert other.train == cfg.train and other.data == cfg.data and other.diffusion == cfg.diffusion
        assert other.model.model_dump(exclude={"attention", "block_size", "preset", "noise"}) == \
            cfg.model.model_dump(exclude={"attention", "block_size", "preset", "noise"})
    with pytest.raises(ValueError, match="unknown objective 'gpt'"):
        objective_config(cfg, "gpt", block_size=4)


def test_answer_tokens_count_the_eos_once_and_never_the_canvas_after_it():
    from dlm_ray.core.inference import Completion
    from dlm_ray.eval.compare import Speed, answer_tokens

    ended = Completion("abc", [1, 2, 3], num_generated=24, num_model_calls=4)  # 3 tokens, an EOS, 20 EOS fill
    cut = Completion("abcd", [1, 2, 3, 4], num_generated=4, num_model_calls=4)  # the length ran out: no EOS
    assert (answer_tokens(ended), answer_tokens(cut)) == (4, 4)
    s = Speed(answers=2, seconds=0.5, answer_tokens=8, calls=8)
    assert (s.answers_per_s, s.seconds_per_answer, s.answer_tokens_per_s, s.tokens_per_call) == (4, 0.25, 16, 1)


def test_measured_speed_adds_up_per_family_and_a_long_family_gets_room():
    """Every held-out prompt is answered and counted once, per family, and the translate family's
    long answers get a generation length that holds them."""
    from dlm_ray.config.schema import ModelConfig, SampleConfig
    from dlm_ray.core.model import Denoiser
    from dlm_ray.core.tokenizer import ByteTokenizer
    from dlm_ray.eval.compare import Row, measure_generation, table

    # A context that holds a translation; one small layer keeps the 96 steps of its answer quick.
    model = Denoiser(ModelConfig(preset="tiny", d_model=32, n_layers=1, n_heads=2, d_mlp=64)).eval()
    cfg = SampleConfig(gen_length=24, steps=24, block_length=24, threshold=0.9, stop_at_eos=True)
    m = measure_generation(model, ByteTokenizer(), cfg, families=["sort", "translate"], num_prompts=2, batch_size=2)
    assert set(m.speed) == set(m.validity) == {"sort", "translate"}
    assert all(s.answers == 2 and s.seconds > 0 for s in m.speed.values())
    # Random weights rarely end an answer: the long family's answers run past the 24 positions given.
    assert m.speed["translate"].answer_tokens > 2 * 24 >= m.speed["sort"].answer_tokens
    total = m.total
    assert total.answers == 4 and total.calls == sum(s.calls for s in m.speed.values())
    row = Row.of("diffusion", "threshold 0.9", 2, None, None, m)
    assert row.tokens_per_call == {f: s.answer_tokens / s.calls for f, s in m.speed.items()}
    assert row.answers_per_s == pytest.approx(4 / total.seconds)
    assert "answers/s" in table([row]) and "answer tokens per model call" in table([row])


@pytest.mark.parametrize("flag,message", [("--gen_batches=64,x", "comma-separated int"),
                                          ("--gen_batches=0", "each >= 1"),
                                          ("--entropy_bounds=-1", "each >= 0")])
def test_bad_measurement_flags_are_refused_before_any_training(flag, message, tmp_path):
    main = runpy.run_path(str(ROOT / "jobs" / "compare.py"))["main"]
    with pytest.raises(SystemExit, match=message):
        main([flag, f"--storage_path={tmp_path}"])
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
