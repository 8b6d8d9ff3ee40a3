"""Model kinds: every attention a config accepts has exactly one kind, and a kind's answers are the
ones the rest of the package relies on (what the pipeline does for it, what a request may ask)."""

from __future__ import annotations

import typing

import pytest
import torch

from dlm_ray.config.schema import ModelConfig, SampleConfig
from dlm_ray.core.kinds import KINDS, MODEL_TYPES, kind_of, kind_of_model
from dlm_ray.core.model import Denoiser
from dlm_ray.core.sampling import generate

MASK = 250


def test_every_attention_a_config_accepts_has_one_kind():
    accepted = set(typing.get_args(ModelConfig.model_fields["attention"].annotation))
    assert accepted == set(KINDS)
    # Every kind has its own model_type; embedding diffusion is the one kind not told by the attention.
    assert len(MODEL_TYPES) == len(KINDS) + 1 and MODEL_TYPES["llada"] == "full"
    assert set(typing.get_args(ModelConfig.model_fields["noise"].annotation)) == {"mask", "gaussian"}
    embedding = kind_of(ModelConfig(preset="tiny", noise="gaussian"))
    assert MODEL_TYPES[embedding.model_type] == "full" and embedding.model_type != kind_of(None).model_type
    assert kind_of(None).attention == "full" and kind_of_model(lambda x, am=None: x).attention == "full"


def test_what_each_kind_asks_of_the_pipeline_and_of_requests(tiny_cfg):
    full, block, ar = (kind_of(tiny_cfg.model_copy(update={"attention": a, "block_size": 4}))
                       for a in ("full", "block_causal", "causal"))
    assert (full.masked_training, block.masked_training, ar.masked_training) == (True, True, False)
    assert (full.block_size, block.block_size, ar.block_size) == (None, 4, None)
    assert (full.can_infill, block.can_infill, ar.can_infill) == (True, False, False)
    req = SampleConfig(gen_length=10, steps=5, block_length=10)
    assert full.resolve(req) == req
    run = block.resolve(req)  # its own blocks, the length rounded up, the exact cache
    assert (run.gen_length, run.block_length, run.cache) == (12, 4, "blocks")
    assert ar.resolve(req).steps == 10
    with pytest.raises(ValueError, match="exact block cache"):
        block.resolve(req.model_copy(update={"cache": "dual"}))
    with pytest.raises(ValueError, match="needs a block-causal model"):
        full.resolve(req.model_copy(update={"cache": "blocks"}))
    with pytest.raises(ValueError, match="autoregressive"):
        ar.resolve(req.model_copy(update={"threshold": 0.9}))


def test_generate_refuses_what_only_resolve_would_adapt(tiny_cfg):
    model = Denoiser(tiny_cfg.model_copy(update={"attention": "block_causal", "block_size": 4})).eval()
    with pytest.raises(ValueError, match="samples in its own blocks"):
        generate(model, torch.tensor([[1, 2]]), SampleConfig(gen_length=8, steps=8, block_length=8), mask_id=MASK)
    out = generate(model, torch.tensor([[1, 2]]), kind_of(model.config).resolve(
        SampleConfig(gen_length=8, steps=8, block_length=8)), mask_id=MASK)
    assert out.shape == (1, 10) and not (out == MASK).any()
