"""Infilling: generation between a prompt and a suffix, and masks filled wherever they stand."""

from __future__ import annotations

import pytest
import torch

from dlm_ray.core.batching import generate_rows, left_pad, right_pad
from dlm_ray.config.schema import ModelConfig, SampleConfig
from dlm_ray.core.model import Denoiser
from dlm_ray.core.sampling import generate, infill

MASK, PAD, EOS = 258, 256, 257


@pytest.fixture
def model(tiny_cfg):
    torch.manual_seed(0)
    # float64 and a wide init: distinct confidences, so no tie can turn on summation order.
    return Denoiser(tiny_cfg.model_copy(update={"init_std": 0.2})).double().eval()


CFG = SampleConfig(gen_length=8, steps=8, block_length=4)


def test_the_middle_sees_the_suffix_and_the_ends_stay_given(model):
    prompt = torch.tensor([[EOS, 10, 11, 12]])
    out_a = generate(model, prompt, CFG, mask_id=MASK, suffix_ids=torch.tensor([[20, 21, 22]]))
    out_b = generate(model, prompt, CFG, mask_id=MASK, suffix_ids=torch.tensor([[90, 91, 92]]))
    assert out_a.shape == (1, 4 + 8 + 3)
    assert out_a[0, :4].tolist() == prompt[0].tolist() and out_a[0, -3:].tolist() == [20, 21, 22]
    assert not (out_a == MASK).any()
    assert not torch.equal(out_a[0, 4:12], out_b[0, 4:12])  # a different suffix, a different middle


def test_padded_suffixes_in_a_batch_equal_rows_alone(model):
    prompts = [[EOS, 5, 6, 7], [EOS, 9], [EOS, 30, 31]]
    suffixes = [[40], [41, 42, 43, 44], [45, 46]]
    seeds = [3, 4, 5]
    for cfg in (CFG, CFG.model_copy(update={"temperature": 1.0}), CFG.model_copy(update={"cache": "dual"})):
        batched, _ = generate_rows(model, prompts, cfg, seeds=seeds, pad_id=PAD, mask_id=MASK, eos_id=EOS,
                                   suffixes=suffixes)
        for p, s, seed, got in zip(prompts, suffixes, seeds, batched):
            alone = generate(model, torch.tensor([p]), cfg, mask_id=MASK, suffix_ids=torch.tensor([s]),
                             generator=[torch.Generator().manual_seed(seed)])
            assert got == alone[0, len(p):len(p) + 8].tolist()


def test_the_suffix_form_is_infill_of_its_canvas(model):
    prompt, suffix = [EOS, 10, 11], [20, 21]
    one_block = SampleConfig(gen_length=6, steps=6, block_length=6)
    gen = generate(model, torch.tensor([prompt]), one_block, mask_id=MASK, suffix_ids=torch.tensor([suffix]))
    canvas = torch.tensor([prompt + [MASK] * 6 + suffix])
    assert torch.equal(infill(model, canvas, one_block, mask_id=MASK), gen)


def test_infill_fills_every_mask_anywhere_and_keeps_the_rest(model):
    canvas = torch.tensor([[EOS, 1, MASK, 3, MASK, MASK, 6, 7, MASK],
                           [EOS, MASK, 2, 3, 4, 5, 6, MASK, 8]])
    stats: dict[str, int] = {}
    out = infill(model, canvas, SampleConfig(gen_length=8, steps=8, block_length=8), mask_id=MASK, stats=stats)
    given = canvas != MASK
    assert torch.equal(out[given], canvas[given]) and not (out == MASK).any()
    assert stats["model_calls"] == 4  # one commit per step; row 0 has the most masks, 4
    # Fewer steps than masks: several commits per step.
    fast: dict[str, int] = {}
    infill(model, canvas, SampleConfig(gen_length=8, steps=2, block_length=8), mask_id=MASK, stats=fast)
    assert fast["model_calls"] == 2
    # Padding is context for nobody; a row alone gives the same tokens.
    ids, am = left_pad([[EOS, 1, MASK, 3], [EOS, MASK, 2, 3, MASK, 5]], PAD)
    batched = infill(model, ids, SampleConfig(gen_length=8, steps=8, block_length=8), mask_id=MASK, attention_mask=am)
    alone = infill(model, torch.tensor([[EOS, 1, MASK, 3]]), SampleConfig(gen_length=8, steps=8, block_length=8),
                   mask_id=MASK)
    assert batched[0, 2:].tolist() == alone[0].tolist()


def test_models_that_cannot_see_ahead_are_refused_and_bad_suffixes_named(model, tiny_cfg):
    prompt, suffix = torch.tensor([[EOS, 10]]), torch.tensor([[20]])
    for kind in ("causal", "block_causal"):
        other = Denoiser(ModelConfig.model_validate({**tiny_cfg.model_dump(), "attention": kind, "block_size": 4}))
        with pytest.raises(ValueError, match="infilling needs a full-attention model"):
            generate(other, prompt, SampleConfig(gen_length=4, steps=4, block_length=4), mask_id=MASK, suffix_ids=suffix)
        with pytest.raises(ValueError, match="infilling needs a full-attention model"):
            infill(other, torch.tensor([[EOS, MASK, 3]]), CFG, mask_id=MASK)
    sids, smask = right_pad([[20], [21, 22]], PAD)
    with pytest.raises(ValueError, match="right-padded"):
        generate(model, torch.tensor([[EOS, 1], [EOS, 2]]), CFG, mask_id=MASK, suffix_ids=sids.flip(1),
                 suffix_mask=smask.flip(1))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, prompt, CFG, mask_id=MASK, suffix_ids=torch.full((1, 200), 5))
    with pytest.raises(ValueError, match="suffix contains mask_id"):
        generate(model, prompt, CFG, mask_id=MASK, suffix_ids=torch.tensor([[MASK]]))
