"""Fast decoding: the block KV cache, threshold, factor, entropy-bound and sub-block rules, early stop; exact
where defined."""

from __future__ import annotations

import pytest
import torch

from dlm_ray.config.schema import SampleConfig
from dlm_ray.core.batching import left_pad
from dlm_ray.core.commit_rules import num_commits
from dlm_ray.core.sampling import generate
from tests.conftest import FAMILIES, family_model

MASK, PAD, EOS = 258, 256, 257


@pytest.fixture(params=list(FAMILIES))
def model(tiny_cfg, request):
    # The Qwen shape: the prefix and dual caches keep key/value heads (and the shifted head's states).
    return family_model(tiny_cfg, request.param, vocab_size=264).eval()


def padded_batch(lengths=(4, 9, 6)):
    return left_pad([torch.randint(0, 250, (n,)).tolist() for n in lengths], PAD)


def run(model, cfg, ids, am=None, **kw):
    stats: dict[str, int] = {}
    out = generate(model, ids, cfg, mask_id=MASK, attention_mask=am, eos_id=EOS, stats=stats, **kw)
    return out, stats["model_calls"]


@torch.no_grad()
def test_window_over_a_fresh_cache_equals_the_full_forward(model):
    ids, am = padded_batch()
    x = torch.cat([ids, torch.randint(0, 250, (3, 20))], 1)
    x[:, 12:] = MASK
    am_full = torch.cat([am, torch.ones(3, 20, dtype=torch.long)], 1)
    full, cache = model.prefill(x, am_full)
    assert torch.equal(full, model(x, am_full))
    for start, stop in [(12, 20), (12, x.shape[1]), (0, 5)]:  # a dual window, a prefix window, the prompt
        window = model.forward_window(x[:, start:stop], start, cache)
        torch.testing.assert_close(window, full[:, start:stop], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [8, 16, 32])
def test_threshold_above_one_without_cache_is_the_reference(model, steps):
    ids, am = padded_batch()
    ref, ref_calls = run(model, SampleConfig(gen_length=32, steps=steps, block_length=16), ids, am)
    fast, calls = run(model, SampleConfig(gen_length=32, steps=steps, block_length=16, threshold=1.5), ids, am)
    assert torch.equal(ref, fast) and calls == ref_calls == steps


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("rule", [{}, {"threshold": 0.05}, {"factor": 2.0}, {"entropy_bound": 2.0},
                                  {"sub_block_length": 4, "threshold": 0.05}])
def test_cache_refreshed_every_step_equals_no_cache(model, cache, rule):
    ids, am = padded_batch()
    base = SampleConfig(gen_length=32, steps=16, block_length=8, **rule)
    plain, plain_calls = run(model, base, ids, am)
    cached, calls = run(model, base.model_copy(update={"cache": cache, "refresh_every": 1}), ids, am)
    assert torch.equal(plain, cached) and calls == plain_calls


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("rule", [{}, {"threshold": 0.9}, {"factor": 1.0}, {"entropy_bound": 1.0},
                                  {"sub_block_length": 4, "threshold": 0.9}, {"sub_block_length": 2}])
def test_every_mask_filled_calls_within_steps_batched_equals_unbatched(model, cache, rule):
    ids, am = padded_batch()
    cfg = SampleConfig(gen_length=24, steps=12, block_length=8, cache=cache, **rule)
    out, calls = run(model, cfg, ids, am)
    assert not (out == MASK).any() and calls <= cfg.steps
    for i in range(3):
        real = ids[i][am[i].bool()]
        single, _ = run(model, cfg, real[None])
        assert torch.equal(out[i, ids.shape[1]:], single[0, len(real):])


def test_a_confident_model_finishes_each_block_in_one_call():
    def sure(x, am=None):  # token 65 everywhere with near-certainty
        logits = torch.zeros(*x.shape, 264)
        logits[..., 65] = 30.0
        return logits

    cfg = SampleConfig(gen_length=32, steps=32, block_length=8, threshold=0.9)
    out, calls = run(sure, cfg, torch.randint(0, 250, (2, 5)))
    assert calls == 4 and (out[:, 5:] == 65).all()  # one call per block instead of eight


def test_factor_and_threshold_counts():
    conf = torch.tensor([[0.99, 0.8, 0.9, 0.1, float("-inf")], [0.2, 0.3, float("-inf"), float("-inf"), 0.1]],
                        dtype=torch.float64)
    zero = torch.tensor([0, 0])
    # Factor 1: the k-th most confident needs >= 1 - 1/(k+1): 0.5, 0.67, 0.75, 0.8 -> rows take 3 and 1.
    assert num_commits(conf, zero, SampleConfig(factor=1.0)).tolist() == [3, 1]
    assert num_commits(conf, zero, SampleConfig(threshold=0.85)).tolist() == [2, 1]
    # Never below the reference schedule, never above the masks left.
    assert num_commits(conf, torch.tensor([1, 9]), SampleConfig(threshold=0.95)).tolist() == [1, 3]


def test_early_stop_drops_finished_rows_from_the_calls():
    batch_sizes = []

    def eos_in_row0(x, am=None):
        batch_sizes.append(x.shape[0])
        logits = torch.zeros(*x.shape, 264)
        logits[..., 65] = 5.0
        logits[x[:, 0] == 1, :, EOS] = 10.0  # rows whose prompt starts with 1 end at once
        return logits

    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cfg = SampleConfig(gen_length=32, steps=16, block_length=8, stop_at_eos=True)
    out, calls = run(eos_in_row0, cfg, prompts)
    assert (out[0, 3:] == EOS).all() and (out[1, 3:] == 65).all()
    # Row 0 is done within its first block (mid-block), row 1 runs all 16 steps alone after that.
    assert batch_sizes[0] == 2 and 1 <= batch_sizes.count(2) <= 4 and batch_sizes == sorted(batch_sizes, reverse=True)
    assert calls == len(batch_sizes) == 16


def test_cache_needs_a_model_that_can_and_no_cfg(model):
    ids = torch.randint(0, 250, (1, 4))
    with pytest.raises(ValueError, match="prefill"):
        generate(lambda x, am=None: torch.zeros(*x.shape, 264), ids,
                 SampleConfig(gen_length=8, steps=8, block_length=8, cache="dual"), mask_id=MASK)
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(model, ids, SampleConfig(gen_length=8, steps=8, block_length=8, cache="prefix", cfg_scale=1.0),
                 mask_id=MASK)


@pytest.mark.parametrize("cache", ["none", "blocks"])
def test_refresh_every_without_a_cache_to_refresh_is_refused_not_ignored(model, cache):
    # Without an approximate cache a refresh does nothing: the setting is an error that names it.
    with pytest.raises(ValueError, match=f"refresh_every=2 needs cache 'prefix' or 'dual' \\(cache is '{cache}'"):
        SampleConfig(gen_length=8, steps=8, block_length=8, cache=cache, refresh_every=2)
    # And the sampler refuses it in a config that skipped validation.
    unchecked = SampleConfig(gen_length=8, steps=8, block_length=8).model_copy(update={"refresh_every": 2})
    with pytest.raises(ValueError, match="refresh_every=2 needs cache"):
        generate(model, torch.tensor([[1, 2, 3]]), unchecked, mask_id=MASK)
    assert SampleConfig(gen_length=8, steps=8, block_length=8, cache="dual", refresh_every=2).refresh_every == 2
