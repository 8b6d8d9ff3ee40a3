"""The autoregressive baseline: causal attention, the next-token loss, exact likelihood, KV-cache
sampling through ``generate``, export, and the settings it refuses."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dlm_ray.core.autoregressive import next_token_loss
from dlm_ray.io.checkpoint import load_inference, save_inference
from dlm_ray.config.schema import ModelConfig, SampleConfig
from dlm_ray.core.likelihood import estimate_nelbo
from dlm_ray.core.kinds import kind_of
from dlm_ray.core.model import Denoiser
from dlm_ray.core.batching import left_pad
from dlm_ray.core.sampling import generate
from tests.conftest import FAMILIES, family_model

MASK, PAD, EOS = 258, 256, 257


@pytest.fixture(params=list(FAMILIES))
def ar_model(tiny_cfg, request):
    torch.manual_seed(0)
    return family_model(tiny_cfg, request.param, attention="causal", init_std=0.2).double().eval()


def naive_greedy(model: Denoiser, prompt: list[int], n: int) -> list[int]:
    """Recompute the whole sequence for every token: no cache, no padding."""
    x = torch.tensor([prompt])
    for _ in range(n):
        logits = model(x)[:, -1].clone()
        logits[:, MASK] = float("-inf")
        x = torch.cat([x, logits.argmax(-1, keepdim=True)], 1)
    return x[0, len(prompt):].tolist()


@torch.no_grad()
def test_a_position_never_sees_a_later_one(ar_model):
    x = torch.randint(0, 250, (2, 12))
    later = x.clone()
    later[:, 7:] = torch.randint(0, 250, (2, 5))
    base, out = ar_model(x), ar_model(later)
    assert torch.equal(out[:, :7], base[:, :7]) and not torch.allclose(out[:, 7:], base[:, 7:])


def test_next_token_loss_is_the_shifted_cross_entropy(ar_model):
    x = torch.randint(0, 250, (3, 10))
    am = torch.ones_like(x)
    am[2, -3:] = 0  # a padded tail: its tokens are no targets
    logits = ar_model(x, am)
    n = (am[:, :-1] & am[:, 1:]).sum()
    loss = next_token_loss(logits, x, am, n, mask_id=MASK)
    logits = logits.index_fill(-1, torch.tensor([MASK]), float("-inf"))  # never a prediction
    want = [F.cross_entropy(logits[b, i], x[b, i + 1], reduction="sum") for b in range(3) for i in range(9)
            if am[b, i + 1]]
    assert n == len(want) == 9 * 3 - 3
    torch.testing.assert_close(loss, torch.stack(want).sum() / n)
    # The fine-tuning form: only the answer (positions >= 4) is scored.
    answer = torch.arange(10)[None, :] >= 4
    part = next_token_loss(logits, x, None, 1, mask_id=MASK, maskable_BL=answer.expand(3, 10))
    want = sum(F.cross_entropy(logits[b, i], x[b, i + 1], reduction="sum") for b in range(3) for i in range(3, 9))
    torch.testing.assert_close(part, want)


@torch.no_grad()
def test_estimate_nelbo_is_the_exact_likelihood(ar_model):
    x = torch.randint(0, 250, (2, 9))
    logp = ar_model(x).index_fill(-1, torch.tensor([MASK]), float("-inf")).log_softmax(-1)
    want = -torch.stack([logp[b, torch.arange(8), x[b, 1:]].mean() for b in range(2)])
    got = estimate_nelbo(ar_model, x, mask_id=MASK, num_samples=3)
    torch.testing.assert_close(got, want.float())  # one forward, no Monte Carlo: num_samples is moot
    answer = torch.zeros_like(x, dtype=torch.bool)
    answer[:, 5:] = True
    cond = estimate_nelbo(ar_model, x, mask_id=MASK, num_samples=1, maskable=answer)
    want = -torch.stack([logp[b, torch.arange(4, 8), x[b, 5:]].mean() for b in range(2)])
    torch.testing.assert_close(cond, want.float())


@torch.no_grad()
def test_cached_sampling_equals_recomputing_and_batches_equal_rows_alone(ar_model):
    prompts = [[EOS, 5, 6, 7, 8], [EOS, 9], [EOS, 40, 41]]
    cfg = SampleConfig(gen_length=10, steps=10, block_length=10)
    ids, am = left_pad(prompts, PAD)
    stats: dict[str, int] = {}
    out = generate(ar_model, ids, cfg, mask_id=MASK, attention_mask=am, stats=stats)
    assert stats["model_calls"] == 10  # one per token: the prompt's pass gives the first
    for k, p in enumerate(prompts):
        assert out[k, ids.shape[1]:].tolist() == naive_greedy(ar_model, p, 10)
    # At a temperature, each row's draws come from its own generator: batched equals alone.
    hot = cfg.model_copy(update={"temperature": 1.0})
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batched = generate(ar_model, ids, hot, mask_id=MASK, attention_mask=am, generator=gens)
    for k, p in enumerate(prompts):
        alone = generate(ar_model, torch.tensor([p]), hot, mask_id=MASK, generator=[torch.Generator().manual_seed(k + 1)])
        assert torch.equal(batched[k, ids.shape[1]:], alone[0, len(p):])
    assert not torch.equal(batched, out)


@torch.no_grad()
def test_the_cache_is_allocated_once_and_written_in_place(ar_model):
    """Each token's call writes its keys/values into the slots allocated with the prompt's pass (no
    copy of the cache per token), and the tokens still equal recomputing everything."""
    prompts = [[EOS, 5, 6, 7, 8], [EOS, 9]]
    ids, am = left_pad(prompts, PAD)
    seen = []
    forward_block = ar_model.forward_block

    def spy(ids_BW, cache, **kw):
        seen.append((cache.layers[-1][1].data_ptr(), cache.length, cache.capacity))
        return forward_block(ids_BW, cache, **kw)
    ar_model.forward_block = spy
    out = generate(ar_model, ids, SampleConfig(gen_length=6, steps=6, block_length=6), mask_id=MASK, attention_mask=am)
    P = ids.shape[1]
    assert {ptr for ptr, _, _ in seen} == {seen[0][0]} and [n for _, n, _ in seen] == list(range(P, P + 5))
    assert all(c == P + 6 for _, _, c in seen)
    for k, p in enumerate(prompts):
        assert out[k, P:].tolist() == naive_greedy(ar_model, p, 6)


@torch.no_grad()
def test_stop_at_eos_ends_a_row_and_the_batch(ar_model):
    cfg = SampleConfig(gen_length=8, steps=8, block_length=8, stop_at_eos=True)
    prompts = [[EOS, 5, 6], [EOS, 70, 71, 72]]
    free = [naive_greedy(ar_model, p, 8) for p in prompts]
    end = free[0][2]  # treat row 0's third token as an end token (as EOT is for an instruct model)
    assert end not in free[1]
    ids, am = left_pad(prompts, PAD)
    stats: dict[str, int] = {}
    out = generate(ar_model, ids, cfg, mask_id=MASK, attention_mask=am, eos_id=EOS, end_ids=[end], stats=stats)
    assert out[0, ids.shape[1]:].tolist() == free[0][:3] + [EOS] * 5
    assert out[1, ids.shape[1]:].tolist() == free[1]
    assert stats["model_calls"] == 8
    alone: dict[str, int] = {}
    generate(ar_model, torch.tensor([prompts[0]]), cfg, mask_id=MASK, eos_id=EOS, end_ids=[end], stats=alone)
    assert alone["model_calls"] == 3  # the batch stops once every row has ended


def test_diffusion_only_settings_are_refused_and_steps_follow_the_length(ar_model):
    cfg = ar_model.config
    ran = kind_of(cfg).resolve(SampleConfig(gen_length=16, steps=4, block_length=8))
    assert (ran.steps, ran.block_length) == (16, 16)
    for bad, msg in [({"cfg_scale": 1.0}, "guidance"), ({"cache": "dual"}, "exact KV cache"),
                     ({"threshold": 0.9}, "one per call")]:
        with pytest.raises(ValueError, match=msg):
            kind_of(cfg).resolve(SampleConfig(gen_length=16, steps=16, block_length=16, **bad))
        with pytest.raises(ValueError, match=msg):
            generate(ar_model, torch.tensor([[EOS, 5]]), SampleConfig(gen_length=16, steps=16, block_length=16, **bad),
                     mask_id=MASK)


def test_export_records_the_kind_and_loads_back(ar_model, tmp_path):
    out = save_inference(ar_model.float(), {"kind": "byte"}, tmp_path / "ar")
    cfg = json.loads((out / "config.json").read_text())
    # The family's own layout (transformers loads it as a causal LM); the kind under our key.
    family = "qwen3" if ar_model.config.qk_norm else "llama"
    assert cfg["model_type"] == family and cfg["architectures"] == [f"{family.title()}ForCausalLM"]
    assert cfg["dlm_ray"]["model"]["attention"] == "causal"
    loaded, _, meta = load_inference(out)
    assert loaded.causal and meta["model"]["attention"] == "causal"
    x = torch.randint(0, 250, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), ar_model.float()(x))
