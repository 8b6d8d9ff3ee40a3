"""Block-causal models: the attention pattern, exact cached sampling, export, and the settings only
one kind of model can use."""

from __future__ import annotations

import json

import pytest
import torch

from dlm_ray.io.checkpoint import CheckpointError, load_inference, save_inference
from dlm_ray.config.schema import ModelConfig, SampleConfig
from dlm_ray.core.model import Denoiser
from dlm_ray.core.batching import left_pad
from dlm_ray.core.sampling import generate
from tests.conftest import FAMILIES, family_model

MASK, PAD, EOS = 258, 256, 257
B = 4  # block size


@pytest.fixture(params=list(FAMILIES))
def block_model(tiny_cfg, request):
    torch.manual_seed(0)
    # float64: the cached and uncached paths add the same numbers in other orders; in float64 no
    # rounding difference can turn a tie, so their tokens must agree exactly.
    return family_model(tiny_cfg, request.param, attention="block_causal", block_size=B).double().eval()


@torch.no_grad()
def test_a_position_sees_its_block_and_the_blocks_before_never_after(block_model):
    x = torch.randint(0, 250, (1, 16))
    base = block_model(x)
    later = x.clone()
    later[0, 12:] = torch.randint(0, 250, (4,))  # block 3 changes
    out = block_model(later)
    assert torch.equal(out[0, :12], base[0, :12]) and not torch.allclose(out[0, 12:], base[0, 12:])
    inside = x.clone()
    inside[0, 9] = (x[0, 9] + 1) % 250  # block 2 changes: all of block 2 (both ways) and block 3 see it
    out = block_model(inside)
    # A shifted model's logits at i read the state at i - 1: a block's first logits read the block before.
    k = 8 + block_model.config.shift_logits
    assert torch.equal(out[0, :k], base[0, :k]) and not torch.allclose(out[0, k], base[0, k])
    # Counted from block_start: with blocks starting at 2, position 1 is in the block before.
    shifted = block_model(x, block_start=2)
    assert not torch.allclose(shifted, base)


@torch.no_grad()
def test_padded_batches_equal_rows_alone(block_model):
    prompts = [torch.randint(0, 250, (n,)).tolist() for n in (3, 7, 5)]
    cfg = SampleConfig(gen_length=12, steps=12, block_length=B)
    ids, am = left_pad(prompts, PAD)
    batched = generate(block_model, ids, cfg, mask_id=MASK, attention_mask=am)
    for k, p in enumerate(prompts):
        alone = generate(block_model, torch.tensor([p]), cfg, mask_id=MASK)
        assert torch.equal(batched[k, ids.shape[1]:], alone[0, len(p):])


RULES = [{}, {"threshold": 0.2}, {"factor": 1.0}, {"temperature": 1.0}, {"remasking": "random", "temperature": 0.5},
         {"stop_at_eos": True, "temperature": 1.0}, {"entropy_bound": 1.0}, {"sub_block_length": 2, "threshold": 0.2},
         {"sub_block_length": 2, "entropy_bound": 0.5, "temperature": 1.0}]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: ",".join(f"{k}={v}" for k, v in r.items()) or "reference")
@pytest.mark.parametrize("lengths", [(6,), (3, 9, 6)], ids=["alone", "batched"])
def test_cached_sampling_equals_recomputing_everything(block_model, rule, lengths):
    """The property that makes the cache worth having: exact, for every rule, batched or not."""
    prompts = [torch.randint(0, 250, (n,)).tolist() for n in lengths]
    ids, am = left_pad(prompts, PAD)
    out, calls, steps = {}, {}, {}
    for cache in ("none", "blocks"):
        cfg = SampleConfig(gen_length=16, steps=16, block_length=B, cache=cache, **rule)
        gens = [torch.Generator().manual_seed(10 + k) for k in range(len(prompts))]
        stats: dict[str, int] = {}
        seen: list[int] = []
        out[cache] = generate(block_model, ids, cfg, mask_id=MASK, attention_mask=am, generator=gens, eos_id=EOS,
                              stats=stats, on_step=lambda i, x, seen=seen: seen.append(i))
        calls[cache], steps[cache] = stats["model_calls"], len(seen)
    assert torch.equal(out["none"], out["blocks"])
    assert not (out["blocks"] == MASK).any()
    # A block costs its decoding steps and nothing more: the prompt's pass is the first block's
    # first step, and each finished block joins the cache in the pass that starts the next.
    assert calls["blocks"] == steps["blocks"] == calls["none"]


def test_the_cached_step_sees_only_the_block_and_the_cache(block_model):
    seen, buffers = [], set()
    forward_block, prefill = block_model.forward_block, block_model.prefill

    def spy(ids, cache, **kw):
        seen.append((ids.shape[1], cache.length, kw.get("finished", 0)))
        buffers.add(cache.layers[0][0].data_ptr())
        return forward_block(ids, cache, **kw)
    block_model.forward_block = spy
    block_model.prefill = lambda ids, am, **kw: seen.append(("prefill", ids.shape[1], kw["cached"])) or prefill(
        ids, am, **kw)
    generate(block_model, torch.randint(0, 250, (1, 6)), SampleConfig(gen_length=12, steps=12, block_length=B,
                                                                        cache="blocks"), mask_id=MASK)
    # The prompt and the first block in one pass (the prompt is cached); each later block starts
    # with a pass over the finished block (cached) and itself; every other step is the block alone
    # against the cache, whose cost does not grow with the steps.
    assert seen == [("prefill", 6 + B, 6)] + [(B, 6, 0)] * 3 + [(2 * B, 6, B)] + [(B, 10, 0)] * 3 \
        + [(2 * B, 10, B)] + [(B, 14, 0)] * 3
    assert len(buffers) == 1  # one cache, allocated once and written in place


@torch.no_grad()
def test_the_folded_pass_equals_writing_the_block_then_predicting_the_next(block_model):
    """One pass over [finished block k, block k+1] caches block k and gives block k+1's logits as
    the full forward does; a padded batch and a cache made without room (it grows) included."""
    x = torch.randint(0, 250, (2, 18))
    am = torch.ones_like(x)
    am[1, :2] = 0
    P = 6
    full = block_model(x, am, block_start=P)
    for capacity in (18, None):
        _, cache = block_model.prefill(x[:, :P], am[:, :P], block_start=P, capacity=capacity)
        logits, same = block_model.forward_block(x[:, P:P + 2 * B], cache, finished=B)
        assert same is cache and cache.length == P + B
        torch.testing.assert_close(logits, full[:, P + B:P + 2 * B], atol=1e-10, rtol=1e-10)
        logits, _ = block_model.forward_block(x[:, P + B:P + 2 * B], cache)  # against the cache alone
        torch.testing.assert_close(logits, full[:, P + B:P + 2 * B], atol=1e-10, rtol=1e-10)
        row = cache.rows(torch.tensor([1]), room=B)  # one row leaves: the other's cache is its own
        logits, _ = block_model.forward_block(x[1:, P + B:P + 2 * B], row)
        torch.testing.assert_close(logits, full[1:, P + B:P + 2 * B], atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="finished=4 must leave at least one"):
        block_model.forward_block(x[:, :B], cache, finished=B)


@pytest.mark.parametrize("settings, message", [
    ({"block_length": 8, "gen_length": 16, "steps": 16}, "block_length must be 4"),
    ({"cache": "dual"}, "for full-attention models"),
    ({"cache": "blocks", "cfg_scale": 1.0}, "cfg_scale"),
])
def test_settings_for_the_other_kind_are_refused(block_model, tiny_cfg, settings, message):
    cfg = SampleConfig(**{"gen_length": 8, "steps": 8, "block_length": B, **settings})
    with pytest.raises(ValueError, match=message):
        generate(block_model, torch.randint(0, 250, (1, 4)), cfg, mask_id=MASK)
    with pytest.raises(ValueError, match="needs a block-causal model"):
        generate(Denoiser(tiny_cfg).eval(), torch.randint(0, 250, (1, 4)),
                 SampleConfig(gen_length=8, steps=8, block_length=8, cache="blocks"), mask_id=MASK)
    with pytest.raises(ValueError, match="does not divide max_seq_len"):
        ModelConfig(preset="tiny", attention="block_causal", block_size=12)


def test_export_records_the_kind_and_an_unknown_kind_is_refused(block_model, tmp_path):
    out = save_inference(block_model.float(), {"kind": "byte"}, tmp_path / "block")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] != "llada" and cfg["attention"] == "block_causal" and cfg["block_size"] == B
    loaded, _, meta = load_inference(out)
    assert loaded.block_causal and loaded.config.block_size == B and meta["model"]["attention"] == "block_causal"
    x = torch.randint(0, 250, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), block_model.float()(x))
    cfg["attention"] = "sliding_window"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="attention = 'sliding_window' is a model kind this version does not know"):
        load_inference(out)


@torch.no_grad()
def test_the_training_forward_conditions_each_noisy_block_on_the_clean_blocks_before_it(block_model):
    """One noisy-and-clean pass equals, block by block, the plain block-causal forward over
    [clean blocks before k, noisy block k]: what sampling conditions block k on."""
    x0 = torch.randint(0, 250, (2, 16))
    xt = x0.masked_fill(torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.5, MASK)
    am = torch.ones_like(x0)
    am[1, :3] = 0  # a left-padded row
    together = block_model(xt, am, clean_ids=x0)
    for k in range(4):
        seq = torch.cat([x0[:, :k * B], xt[:, k * B:(k + 1) * B]], 1)
        alone = block_model(seq, am[:, :(k + 1) * B])[:, k * B:]
        torch.testing.assert_close(together[:, k * B:(k + 1) * B][am[:, k * B:(k + 1) * B].bool()],
                                   alone[am[:, k * B:(k + 1) * B].bool()], atol=1e-10, rtol=1e-10)


def test_each_block_has_its_own_noise_level_a_function_of_seed_epoch_and_row():
    import numpy as np

    from dlm_ray.config.schema import DiffusionConfig
    from dlm_ray.core.diffusion import mask_rows

    rows = {"input_ids": np.random.default_rng(0).integers(0, 250, (8, 32)), "attention_mask": np.ones((8, 32)),
            "epoch": np.zeros(8, dtype=np.int64), "row_id": np.arange(8) + 100, "row_index": np.arange(8)}
    for sampling in ("uniform", "low_discrepancy"):
        cfg = DiffusionConfig(time_sampling=sampling)
        m = mask_rows(rows, cfg, seed=1, mask_id=MASK, strata=8, block_size=8)
        p = m["p_mask"].reshape(8, 4, 8)
        assert m["t"].shape == (8, 4) and (p == p[..., :1]).all()  # one level per block
        assert len(np.unique(m["t"])) == 32  # blocks of a row (and rows) differ
        again = mask_rows({k: v[::-1].copy() for k, v in rows.items()}, cfg, seed=1, mask_id=MASK, strata=8,
                          block_size=8)
        if sampling == "uniform":  # a row's draws do not depend on its batch
            assert np.array_equal(again["noisy_ids"][::-1], m["noisy_ids"])
    t = m["t"]  # low discrepancy: each row's four blocks fall in four different quarters of [0, 1)
    assert all(len(set((row * 4).astype(int).clip(0, 3))) >= 3 for row in t)


def test_the_block_bound_of_uniform_logits_is_log_v_minus_one():
    """The block diffusion bound with a model that knows nothing: log(V - 1) per token exactly."""
    import math

    from dlm_ray.core.likelihood import estimate_nelbo

    class Uniform:
        block_causal = True
        config = ModelConfig(preset="tiny", attention="block_causal", block_size=B)

        def __call__(self, x, am=None, clean_ids=None):
            assert clean_ids is not None  # the noisy-and-clean form
            return torch.zeros(*x.shape, 264)

    am = torch.ones(2, 16, dtype=torch.long)
    am[1, :5] = 0
    nats = estimate_nelbo(Uniform(), torch.randint(0, 250, (2, 16)), mask_id=MASK, num_samples=4,
                          attention_mask=am, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nats, torch.full((2,), math.log(263)), atol=1e-5, rtol=1e-5)


def test_block_models_train_evaluate_export_and_sample(ray_cluster, tmp_path):
    """A block diffusion run end to end: Ray Data masks each block at its own level, DeepSpeed
    trains on the noisy-and-clean form, the held-out bound is finite, the export samples."""
    from dlm_ray.io.checkpoint import export, run_dir
    from dlm_ray.config.schema import PretrainConfig
    from dlm_ray.config.io import load_config
    from dlm_ray.eval.scoring import validity
    from dlm_ray.core.kinds import kind_of
    from dlm_ray.train.metrics import read_metrics
    from dlm_ray.train.fit import fit

    cfg = load_config(PretrainConfig, None, [
        "--run_name=block", f"--storage_path={tmp_path / 'runs'}", "--model.d_model=64", "--model.n_layers=2",
        "--model.d_mlp=128", "--model.max_seq_len=64", "--model.attention=block_causal", "--model.block_size=8",
        "--data.seq_len=32", "--data.builtin_docs=3000", "--data.builtin_shards=2", "--data.conditional_fraction=0",
        "--train.batch_size=16", "--train.max_steps=20", "--train.lr=3e-3", "--train.warmup_steps=2",
        "--train.log_every=1", "--train.eval_every=10", "--train.eval_batches=2", "--train.checkpoint_every=20",
        "--train.max_failures=0", "--eval.nelbo_samples=2"])
    result = fit(cfg)
    history = read_metrics(run_dir(cfg))
    loss = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert sum(loss[s] for s in range(16, 21)) < 0.8 * sum(loss[s] for s in range(1, 6))
    vals = [h["val_nelbo_bits"] for h in history if "val_nelbo_bits" in h]
    assert len(vals) == 2 and all(0 < v < 20 for v in vals)
    with result.checkpoint.as_directory() as ckpt:
        out = export(ckpt, tmp_path / "export")
    model, tok, meta = load_inference(out)
    assert model.block_causal and meta["model"]["block_size"] == 8
    cfg_s = kind_of(model.config).resolve(SampleConfig(gen_length=20, steps=10, block_length=20))
    assert (cfg_s.gen_length, cfg_s.block_length, cfg_s.steps, cfg_s.cache) == (24, 8, 12, "blocks")
    report = validity(model, tok, ["sort"], SampleConfig(gen_length=20, steps=10, block_length=20), num_prompts=4)
    assert 0 <= report.rates["sort"] <= 1 and len(report.samples["sort"]) == 3


def test_batch_generation_runs_a_block_model_in_its_own_blocks(ray_cluster, block_model, tmp_path):
    from dlm_ray.config.inference import GenerateConfig
    from dlm_ray.serving.batch import run
    from dlm_ray.core.inference import complete_ids
    from dlm_ray.core.kinds import kind_of
    from dlm_ray.core.text import encode_prompt
    import pyarrow.dataset as pads

    ckpt = save_inference(block_model.float(), {"kind": "byte"}, tmp_path / "block")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.jsonl").write_text("".join(json.dumps({"prompt": f"s{i}9{i}="}) + "\n" for i in range(12)))
    cfg = GenerateConfig(checkpoint=str(ckpt), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                         actors=(1, 1), progress_bars=False, batch_size=8,
                         sample=SampleConfig(gen_length=10, steps=10, block_length=10, temperature=1.0))
    summary = run(cfg)
    assert summary["rows"] == 12 and summary["rows_errored"] == 0
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    used = SampleConfig.model_validate_json(rows[0]["sample"])
    assert (used.gen_length, used.block_length, used.cache) == (12, B, "blocks")  # whole blocks, exact cache
    model, tok, _ = load_inference(ckpt)
    for r in rows[:3]:
        local = complete_ids(model, tok, [encode_prompt(tok, r["prompt"])], kind_of(model.config).resolve(cfg.sample),
                             [r["seed"]])[0]
        assert r["completion"] == local.text


def test_the_main_job_runs_on_the_block_config(ray_cluster, tmp_path):
    """jobs/pretrain.py with jobs/configs/tiny_block.yaml (fewer steps and prompts): train, export,
    score, each with the block model."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("pretrain_job", root / "jobs" / "pretrain.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    summary = job.main(["--config", str(root / "jobs" / "configs" / "tiny_block.yaml"), f"--storage_path={tmp_path}",
                        "--train.max_steps=10", "--train.checkpoint_every=10", "--train.eval_every=10",
                        "--train.log_every=5", "--data.builtin_docs=3000", "--eval.num_prompts_per_family=4",
                        "--eval.num_nelbo_docs=16", "--eval.nelbo_samples=2"])
    assert summary["steps"] == 10 and 0 < summary["nelbo_bits_after"] < summary["nelbo_bits_before"]
    model, _, meta = load_inference(summary["export"])
    assert model.block_causal and meta["model"]["block_size"] == 8


@pytest.mark.parametrize("shift", [False, True])
def test_a_cache_write_asks_for_no_logits_and_too_many_are_refused(shift):
    """``forward_block(extend=True, logits_len=0)`` writes a block's keys/values and returns no
    logits, shifted head or not; asking for more logits than the pass predicts is an error."""
    from dlm_ray.config.schema import ModelConfig
    from dlm_ray.core.model import Denoiser

    m = Denoiser(ModelConfig(preset="tiny", d_model=32, n_layers=1, n_heads=2, d_mlp=64, attention="block_causal",
                             block_size=4, shift_logits=shift)).eval()
    _, cache = m.prefill(torch.randint(4, 200, (2, 8)), None, block_start=8, logits_span=(7, 8), capacity=16)
    logits, grown = m.forward_block(torch.randint(4, 200, (2, 4)), cache, extend=True, logits_len=0)
    assert logits.shape == (2, 0, m.config.vocab_size) and grown is not None and grown.length == 12
    with pytest.raises(ValueError, match="logits_len=5"):
        m.forward_block(torch.randint(4, 200, (2, 4)), grown, logits_len=5)
