"""Adapting an autoregressive checkpoint into a diffusion model: the run's settings over the
checkpoint's (``with_init_from``), the recipe's defaults, DiffuLLaMA's attention annealing (against a
transcription of its rule), LLaDA 2.0's block-size warm-up, Fast-dLLM v2's complementary masks, and
one small adaptation on Ray Train + DeepSpeed that exports a diffusion model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dlm_ray.config.io import load_config
from dlm_ray.config.schema import DiffusionConfig, PretrainConfig
from dlm_ray.core.adapt import (anneal_ratio, annealed_visible, block_size_at, step_generator, training_attention,
                                warmup_block_sizes)
from dlm_ray.core.diffusion import mask_rows, with_complements
from dlm_ray.core.model import Denoiser
from dlm_ray.io.checkpoint import save_inference
from dlm_ray.train.fit import with_init_from

SMALL = ["--model.d_model=32", "--model.n_layers=2", "--model.n_heads=4", "--model.d_mlp=64",
         "--model.max_seq_len=64"]


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory) -> Path:
    """An autoregressive checkpoint (random weights) of a small shape, in the export format."""
    cfg = load_config(PretrainConfig, None, [*SMALL, "--model.attention=causal"]).model
    return Path(save_inference(Denoiser(cfg).eval(), {"kind": "byte"}, tmp_path_factory.mktemp("ar") / "export"))


def resolved(init: Path, *overrides: str) -> PretrainConfig:
    return with_init_from(load_config(PretrainConfig, None, [f"--init_from={init}", "--data.seq_len=32", *overrides]))


# ------------------------------------------------------------------------------- with_init_from


def test_a_given_attention_wins_over_the_checkpoints_and_adapts_it(causal_dir):
    recipe = ["--adapt.lr=3e-4", "--adapt.warmup_steps=20"]
    cfg = resolved(causal_dir, "--model.attention=full", *recipe)
    assert cfg.model.attention == "full" and cfg.model.d_model == 32 and cfg.model.n_layers == 2
    assert cfg.model.shift_logits and cfg.adapt.from_causal  # the recipe: the AR head's alignment kept
    assert (cfg.train.lr, cfg.train.warmup_steps) == (3e-4, 20)  # the recipe's, train giving none
    assert not cfg.diffusion.complementary  # a block diffusion recipe's, not full attention's
    same = resolved(causal_dir, "--model.attention=full", *recipe, "--model.d_model=32", "--model.n_kv_heads=4",
                    "--model.head_dim=8")  # the weights' own settings, given as they are: accepted
    assert same == cfg
    block = resolved(causal_dir, "--model.attention=block_causal", "--model.block_size=8", *recipe, "--train.lr=2e-3",
                     "--model.max_seq_len=32")
    assert (block.model.attention, block.model.block_size, block.model.max_seq_len) == ("block_causal", 8, 32)
    assert block.diffusion.complementary and block.model.shift_logits
    assert block.train.lr == 2e-3 and block.train.warmup_steps == 20  # train's own wins
    assert with_init_from(block) == block  # the driver and fit() both apply it


def test_given_recipe_settings_win_and_a_run_that_adapts_nothing_refuses_them(causal_dir):
    cfg = resolved(causal_dir, "--model.attention=block_causal", "--model.block_size=4", "--model.shift_logits=false",
                   "--diffusion.complementary=false", "--adapt.block_warmup_steps=3")
    assert not cfg.model.shift_logits and not cfg.diffusion.complementary and cfg.adapt.block_warmup_steps == 3
    plain = resolved(causal_dir)  # no attention given: continued autoregressive training, as before
    assert plain.model.attention == "causal" and not plain.adapt.from_causal and not plain.model.shift_logits
    with pytest.raises(ValueError, match="adapt.anneal_steps=7"):
        resolved(causal_dir, "--adapt.anneal_steps=7")
    with pytest.raises(ValueError, match="adapt.block_warmup_steps"):
        resolved(causal_dir, "--model.attention=full", "--adapt.block_warmup_steps=5")
    with pytest.raises(ValueError, match="adapt.from_causal"):
        load_config(PretrainConfig, None, ["--adapt.from_causal=true"])


@pytest.mark.parametrize("override, name", [
    ("--model.d_model=64", "model.d_model=64"), ("--model.n_layers=3", "model.n_layers=3"),
    ("--model.n_kv_heads=2", "model.n_kv_heads=2"), ("--model.head_dim=16", "model.head_dim=16"),
    ("--model.qkv_bias=true", "model.qkv_bias=True"), ("--model.tie_embeddings=true", "model.tie_embeddings=True"),
    ("--model.vocab_size=300", "model.vocab_size=300"), ("--model.max_seq_len=128", "model.max_seq_len=128"),
    ("--model.preset=small", "model.d_model=768")])
def test_a_setting_that_contradicts_the_weights_is_refused_by_name(causal_dir, override, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        resolved(causal_dir, "--model.attention=full", override)


# ----------------------------------------------------------------------- DiffuLLaMA's annealing


def diffullama_mask(length: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """DiffuLLaMA's annealed attention mask, transcribed from its description: a causal lower
    triangle (the diagonal included) OR-ed with a Bernoulli(ratio) draw over the whole L x L."""
    cond = torch.arange(length)
    causal = torch.zeros(length, length)
    causal.masked_fill_(cond < (cond + 1).view(length, 1), 1)
    random = torch.bernoulli(torch.full((length, length), 0.0) + ratio, generator=generator)
    return torch.logical_or(causal.bool(), random.bool())


def test_annealing_runs_from_causal_to_full_as_diffullama_draws_it():
    L, anneal = 96, 100
    assert torch.equal(annealed_visible(0, anneal, L, seed=3), torch.ones(L, L, dtype=torch.bool).tril())
    assert annealed_visible(anneal, anneal, L, seed=3).all() and annealed_visible(5 * anneal, anneal, L, seed=3).all()
    fractions = []
    for step in range(0, anneal + 1, 10):
        got = annealed_visible(step, anneal, L, seed=3)
        assert torch.equal(got, diffullama_mask(L, min(1.0, step / anneal), step_generator(3, step)))
        assert torch.equal(got, annealed_visible(step, anneal, L, seed=3))  # a function of (seed, step)
        fractions.append(float(got.triu(1).sum()) / (L * (L - 1) / 2))
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1
    assert [anneal_ratio(s, anneal) for s in (0, 50, 100, 150)] == [0, 0.5, 1, 1] and anneal_ratio(0, 0) == 1


def test_the_annealed_mask_reaches_the_model(tiny_cfg):
    """Step 0 of a full-attention adaptation is the causal model itself (shifted: position i reads
    hidden i - 1); a fully visible mask is the plain forward."""
    torch.manual_seed(0)
    ar = Denoiser(tiny_cfg.model_copy(update={"attention": "causal"})).eval()
    adapted = Denoiser(tiny_cfg.model_copy(update={"attention": "full", "shift_logits": True})).eval()
    adapted.load_state_dict(ar.state_dict())
    ids = torch.randint(0, 200, (2, 24))
    am = torch.ones_like(ids)
    am[1, :5] = 0  # left padding
    extra = training_attention(adapted.config, PretrainConfig().adapt.model_copy(update={"from_causal": True}), 0,
                               seq_len=24, seed=0)
    with torch.no_grad():
        got = adapted(ids, am, **extra)
        torch.testing.assert_close(got[:, 1:], ar(ids, am)[:, :-1], rtol=1e-5, atol=1e-5)
        everything = adapted(ids, am, visible_LL=torch.ones(24, 24, dtype=torch.bool))
        read_real = am.bool() & torch.cat([am[:, :1], am[:, :-1]], 1).bool()  # (padding's logits mean nothing)
        torch.testing.assert_close(everything[read_real], adapted(ids, am)[read_real])


# -------------------------------------------------------------------- LLaDA 2.0's block warm-up


def test_block_sizes_grow_from_one_to_the_models():
    assert [warmup_block_sizes(b) for b in (1, 4, 8, 16, 32, 6)] == [[], [1], [1, 4], [1, 4], [1, 4, 16], [1]]
    assert [block_size_at(s, 16, 10) for s in (0, 9, 10, 19, 20, 500)] == [1, 1, 4, 4, 16, 16]
    assert block_size_at(0, 16, 0) == 16


def test_blocks_of_one_with_the_shift_are_the_causal_model(tiny_cfg):
    torch.manual_seed(0)
    ar = Denoiser(tiny_cfg.model_copy(update={"attention": "causal"})).eval()
    block = Denoiser(tiny_cfg.model_copy(update={"attention": "block_causal", "block_size": 8,
                                                 "shift_logits": True})).eval()
    block.load_state_dict(ar.state_dict())
    clean = torch.randint(0, 200, (2, 32))
    noisy = clean.masked_fill(torch.rand(2, 32) < 0.5, 256)
    adapt = PretrainConfig().adapt.model_copy(update={"from_causal": True, "block_warmup_steps": 10})
    extra = training_attention(block.config, adapt, 0, seq_len=32, seed=0)
    assert extra == {"block_size": 1} and training_attention(block.config, adapt, 20, seq_len=32, seed=0) == {}
    with torch.no_grad():
        torch.testing.assert_close(block(noisy, clean_ids=clean, **extra)[:, 1:], ar(clean)[:, :-1],
                                   rtol=1e-5, atol=1e-5)


def test_the_block_bound_keeps_no_graph(tiny_cfg):
    """Held-out scoring of a block model during training: its samples' graphs must not pile up (they
    did: gigabytes per rank at every evaluation of the tiny model, until the node ran out)."""
    from dlm_ray.core.likelihood import estimate_nelbo

    block = Denoiser(tiny_cfg.model_copy(update={"attention": "block_causal", "block_size": 4})).train()
    nats = estimate_nelbo(block, torch.randint(0, 200, (2, 16)), mask_id=256, num_samples=2)
    assert not nats.requires_grad and nats.grad_fn is None


# ------------------------------------------------------------------ Fast-dLLM v2's complementary masks


@pytest.mark.parametrize("block_size", [None, 4])
def test_complementary_masks_cover_every_maskable_token_once(block_size):
    R, L, eps = 6, 16, 1e-3
    rng = np.random.default_rng(0)
    am = np.ones((R, L), dtype=np.int32)
    am[0, 10:] = 0
    given = np.zeros((R, L), dtype=bool)
    given[1, :5] = True  # a conditional row's prompt: never masked, in either view
    rows = {"input_ids": rng.integers(0, 200, (R, L)).astype(np.int32), "attention_mask": am, "given": given,
            "row_id": np.arange(R, dtype=np.int64) * 7919, "row_index": np.arange(R), "epoch": np.zeros(R, np.int32)}
    out = mask_rows(rows, DiffusionConfig(complementary=True, eps=eps), seed=0, mask_id=256, strata=R,
                    block_size=block_size)
    maskable = am.astype(bool) & ~given
    a, b = out["loss_mask"], out["loss_mask_c"]
    assert not (a & b).any() and np.array_equal(a | b, maskable)
    assert np.array_equal(out["noisy_ids_c"] == 256, b) and np.array_equal(out["noisy_ids"] == 256, a)
    np.testing.assert_allclose(out["p_mask_c"], np.maximum(1 - out["p_mask"].astype(np.float64), eps), rtol=1e-6)
    assert "noisy_ids_c" not in mask_rows(rows, DiffusionConfig(), seed=0, mask_id=256)
    batch = with_complements({k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in out.items()})
    assert batch["noisy_ids"].shape == (2 * R, L) and "loss_mask_c" not in batch
    assert torch.equal(batch["loss_mask"][R:], torch.as_tensor(b)) and torch.equal(batch["input_ids"][R:],
                                                                                    batch["input_ids"][:R])


# ------------------------------------------------------------------------------ end to end


def test_an_autoregressive_checkpoint_adapts_into_a_block_diffusion_export(ray_cluster, tmp_path, causal_dir):
    from dlm_ray.io.checkpoint import export, load_inference, run_dir
    from dlm_ray.train.fit import fit
    from dlm_ray.train.metrics import read_metrics

    args = [f"--storage_path={tmp_path / 'runs'}", "--run_name=adapt", f"--init_from={causal_dir}",
            "--model.attention=block_causal", "--model.block_size=8", "--adapt.block_warmup_steps=2",
            "--data.seq_len=32", "--data.builtin_docs=3000", "--data.builtin_shards=2", "--train.batch_size=8",
            "--train.max_steps=6", "--train.log_every=2", "--train.eval_every=6", "--train.eval_batches=1",
            "--train.checkpoint_every=6", "--train.max_failures=0", "--eval.nelbo_samples=2"]
    cfg = with_init_from(load_config(PretrainConfig, None, args))
    result = fit(cfg)
    with result.checkpoint.as_directory() as ckpt:
        out = export(ckpt, tmp_path / "export")
    raw = json.loads((Path(out) / "config.json").read_text())
    assert raw["model_type"] not in ("dlm_ray_autoregressive", "llama", "qwen2", "qwen3")  # no autoregressive layout
    model, _, meta = load_inference(out)
    assert model.config.attention == "block_causal" and model.config.shift_logits and model.config.block_size == 8
    assert meta["source"]["step"] == 6 and [h["step"] for h in read_metrics(run_dir(cfg)) if "loss" in h] == [2, 4, 6]
    ar, _, _ = load_inference(causal_dir)
    assert not torch.equal(model.wte.weight, ar.wte.weight)  # trained from the checkpoint's weights
