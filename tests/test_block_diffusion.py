"""Block-causal models: the attention pattern, exact cached sampling, export, and the settings only
one kind of model can use."""

from __future__ import annotations

import json

import pytest
import torch

from dlm_ray.checkpoint import CheckpointError, load_inference, save_inference
from dlm_ray.config import ModelConfig, SampleConfig
from dlm_ray.model import Denoiser
from dlm_ray.sampling import generate, left_pad

MASK, PAD, EOS = 258, 256, 257
B = 4  # block size


@pytest.fixture
def block_model(tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg.model_copy(update={"attention": "block_causal", "block_size": B})
    # float64: the cached and uncached paths add the same numbers in other orders; in float64 no
    # rounding difference can turn a tie, so their tokens must agree exactly.
    return Denoiser(ModelConfig.model_validate(cfg.model_dump())).double().eval()


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
    assert torch.equal(out[0, :8], base[0, :8]) and not torch.allclose(out[0, 8], base[0, 8])
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
         {"stop_at_eos": True, "temperature": 1.0}]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: ",".join(f"{k}={v}" for k, v in r.items()) or "reference")
@pytest.mark.parametrize("lengths", [(6,), (3, 9, 6)], ids=["alone", "batched"])
def test_cached_sampling_equals_recomputing_everything(block_model, rule, lengths):
    """The property that makes the cache worth having: exact, for every rule, batched or not."""
    prompts = [torch.randint(0, 250, (n,)).tolist() for n in lengths]
    ids, am = left_pad(prompts, PAD)
    out, calls = {}, {}
    for cache in ("none", "blocks"):
        cfg = SampleConfig(gen_length=16, steps=16, block_length=B, cache=cache, **rule)
        gens = [torch.Generator().manual_seed(10 + k) for k in range(len(prompts))]
        stats: dict[str, int] = {}
        out[cache] = generate(block_model, ids, cfg, mask_id=MASK, attention_mask=am, generator=gens, eos_id=EOS,
                              stats=stats)
        calls[cache] = stats["model_calls"]
    assert torch.equal(out["none"], out["blocks"])
    assert not (out["blocks"] == MASK).any()
    # The cache costs one pass for the prompt and one per finished block, beyond the steps.
    assert calls["blocks"] <= calls["none"] + 1 + 16 // B - 1


def test_the_cached_step_sees_only_the_block_and_the_cache(block_model):
    seen = []
    forward_block = block_model.forward_block

    def spy(ids, cache, **kw):
        seen.append((ids.shape[1], cache.pos_BL.shape[1], kw.get("extend", False)))
        return forward_block(ids, cache, **kw)
    block_model.forward_block = spy
    generate(block_model, torch.randint(0, 250, (1, 6)), SampleConfig(gen_length=12, steps=12, block_length=B,
                                                                        cache="blocks"), mask_id=MASK)
    steps = [(w, s) for w, s, ext in seen if not ext]
    assert all(w == B for w, _ in steps)  # a step's forward is the block alone: its cost does not grow
    assert [s for _, s in steps] == [6] * 4 + [10] * 4 + [14] * 4  # against the prompt, then each finished block


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


def test_training_and_the_full_attention_bound_refuse_a_block_model(block_model, tmp_path):
    from dlm_ray.config import PretrainConfig
    from dlm_ray.config_io import load_config
    from dlm_ray.diffusion import estimate_nelbo
    from dlm_ray.train import fit

    with pytest.raises(ValueError, match="block diffusion model needs its own objective"):
        fit(load_config(PretrainConfig, None, [f"--storage_path={tmp_path}", "--model.attention=block_causal",
                                               "--model.block_size=4"]))
    with pytest.raises(ValueError, match="block-causal model's bound"):
        estimate_nelbo(block_model, torch.randint(0, 250, (1, 8)), mask_id=MASK, num_samples=1)
