"""The reference sampler: exactness, commit schedule, batching, CFG, EOS and bad settings."""

from __future__ import annotations

import pytest
import torch

from dlm_ray.config.schema import SampleConfig
from dlm_ray.core.model import Denoiser
from dlm_ray.core.batching import left_pad, trim_after_eos
from dlm_ray.core.denoise import num_transfer_tokens
from dlm_ray.core.sampling import generate

MASK, PAD, EOS = 258, 256, 257


@pytest.fixture
def model(tiny_cfg):
    return Denoiser(tiny_cfg.model_copy(update={"vocab_size": 264})).eval()


def reference_llada(model, prompt, gen_length, steps, block_length):
    """A line-by-line transcription of the published algorithm (batch 1, T=0, low confidence)."""
    x = torch.cat([prompt, torch.full((1, gen_length), MASK)], 1)
    P, num_blocks = prompt.shape[1], gen_length // block_length
    k = steps // num_blocks
    for b in range(num_blocks):
        m = int((x[0, P + b * block_length: P + (b + 1) * block_length] == MASK).sum())
        counts = [m // k + (1 if i < m % k else 0) for i in range(k)]
        for i in range(k):
            logits = model(x)
            logits[..., MASK] = float("-inf")
            x0 = logits.argmax(-1)
            conf = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            conf[:, P + (b + 1) * block_length:] = float("-inf")
            conf[x != MASK] = float("-inf")
            idx = conf[0].topk(counts[i]).indices
            x[0, idx] = x0[0, idx]
    return x


@pytest.mark.parametrize("gen_length,steps,block_length", [(16, 16, 16), (24, 12, 8), (20, 8, 10)])
def test_equals_reference_algorithm(model, gen_length, steps, block_length):
    prompt = torch.randint(0, 250, (1, 7))
    cfg = SampleConfig(gen_length=gen_length, steps=steps, block_length=block_length)
    out = generate(model, prompt, cfg, mask_id=MASK)
    assert torch.equal(out, reference_llada(model, prompt, gen_length, steps, block_length))


def test_schedule_commits_and_blocks(model):
    cfg = SampleConfig(gen_length=20, steps=8, block_length=10)
    prompt = torch.randint(0, 250, (2, 5))
    canvases = []
    out = generate(model, prompt, cfg, mask_id=MASK, on_step=lambda i, x: canvases.append(x.clone()))
    assert len(canvases) == cfg.steps and not (out == MASK).any()
    assert torch.equal(out[:, :5], prompt)
    prev = torch.cat([prompt, torch.full((2, 20), MASK)], 1)
    per_step = []
    for step, x in enumerate(canvases):
        newly = (prev == MASK) & (x != MASK)
        assert torch.equal(x[prev != MASK], prev[prev != MASK]), "a committed token changed"
        per_step.append(newly.sum(-1).tolist())
        # Block 0 is finished before block 1 receives anything.
        if step < 4:
            assert not newly[:, 15:].any()
        prev = x
    # 10 masks over 4 steps per block: 3, 3, 2, 2 (earlier steps take the remainder).
    assert per_step == [[3, 3], [3, 3], [2, 2], [2, 2]] * 2
    assert num_transfer_tokens(torch.tensor([10, 7]), 4).tolist() == [[3, 3, 2, 2], [2, 2, 2, 1]]


def test_deterministic_for_a_seed(model):
    cfg = SampleConfig(gen_length=16, steps=8, block_length=8, temperature=1.0, remasking="random")
    prompt = torch.randint(0, 250, (2, 4))
    run = lambda s: generate(model, prompt, cfg, mask_id=MASK, generator=torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    assert not (run(5) == MASK).any()


def test_batched_left_padded_equals_unbatched(model):
    cfg = SampleConfig(gen_length=16, steps=16, block_length=8)
    prompts = [torch.randint(0, 250, (n,)) for n in (3, 9, 6)]
    ids, am = left_pad([p.tolist() for p in prompts], PAD)
    width = ids.shape[1]
    batched = generate(model, ids, cfg, mask_id=MASK, attention_mask=am)
    for i, p in enumerate(prompts):
        single = generate(model, p[None], cfg, mask_id=MASK)
        assert torch.equal(batched[i, width:], single[0, len(p):])


def test_per_row_generators_make_rows_independent_of_their_batch(model):
    # The batch job seeds each row: a row's sample must not depend on who shares its batch.
    cfg = SampleConfig(gen_length=16, steps=8, block_length=8, temperature=1.0)
    prompts = [torch.randint(0, 250, (n,)) for n in (5, 2, 7)]
    ids, am = left_pad([p.tolist() for p in prompts], PAD)
    width = ids.shape[1]
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    batched = generate(model, ids, cfg, mask_id=MASK, attention_mask=am, generator=gens())
    assert torch.equal(batched, generate(model, ids, cfg, mask_id=MASK, attention_mask=am, generator=gens()))
    for i, p in enumerate(prompts):
        single = generate(model, p[None], cfg, mask_id=MASK, generator=[gens()[i]])
        assert torch.equal(batched[i, width:], single[0, len(p):])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        generate(model, ids, cfg, mask_id=MASK, attention_mask=am, generator=gens()[:2])


def test_cfg_runs_with_and_without_attention_mask(model):
    prompt = torch.randint(0, 250, (2, 6))
    calls = []

    def spy(x, am=None):
        calls.append(x.shape[0])
        return model(x, am)

    cfg = SampleConfig(gen_length=8, steps=4, block_length=8, cfg_scale=1.5)
    a = generate(spy, prompt, cfg, mask_id=MASK, max_length=64)
    b = generate(spy, prompt, cfg, mask_id=MASK, attention_mask=torch.ones_like(prompt), max_length=64)
    assert set(calls) == {4}  # conditional and unconditional rows in one call
    assert torch.equal(a, b) and not (a == MASK).any()
    plain = generate(model, prompt, cfg.model_copy(update={"cfg_scale": 0.0}), mask_id=MASK)
    assert not torch.equal(a, plain)  # guidance changes the result


def test_stop_at_eos():
    calls = []

    def eos_model(x, am=None):
        calls.append(1)
        logits = torch.zeros(*x.shape, 264)
        logits[..., EOS] = 10.0
        return logits

    cfg = SampleConfig(gen_length=32, steps=16, block_length=8, stop_at_eos=True)
    out = generate(eos_model, torch.randint(0, 250, (2, 3)), cfg, mask_id=MASK, eos_id=EOS)
    assert len(calls) <= 4  # done within the first block of 4 steps, not 16 steps
    assert (out[:, 3:] == EOS).all()
    assert trim_after_eos([5, 6, EOS, 7], EOS) == [5, 6]


EOT = 250  # an instruct model's end-of-turn token, in these stubs


def preferring(favourite: dict[int, float], width: int = 264):
    """A stub model whose logits favour the given tokens (by position parity: EOS/EOT at even
    positions, the token 'a' (97) at odd ones), with call counting."""
    calls = []

    def model(x, am=None):
        calls.append(1)
        logits = torch.zeros(*x.shape, width)
        even = torch.arange(x.shape[1]) % 2 == 0
        for tok, value in favourite.items():
            logits[:, even, tok] = value
        logits[:, ~even, 97] = 3.0
        return logits
    model.calls = calls
    return model


def test_eot_ends_the_answer_like_eos():
    calls = []

    def eot_model(x, am=None):
        calls.append(1)
        logits = torch.zeros(*x.shape, 264)
        logits[..., EOT] = 10.0
        return logits

    cfg = SampleConfig(gen_length=16, steps=16, block_length=8, stop_at_eos=True)
    out = generate(eot_model, torch.randint(0, 200, (2, 3)), cfg, mask_id=MASK, eos_id=EOS, end_ids=[EOS, EOT])
    assert len(calls) <= 8 and (out[:, 11:] == EOS).all()  # done in the first block; the rest EOS at once
    assert torch.isin(out[:, 3:], torch.tensor([EOS, EOT])).all()
    calls.clear()
    generate(eot_model, torch.randint(0, 200, (2, 3)), cfg, mask_id=MASK, eos_id=EOS)
    assert len(calls) == 16  # EOT alone is no end unless the caller says so
    assert trim_after_eos([5, EOT, 6, EOS], [EOS, EOT]) == [5]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_eos_and_eot_proposals_are_committed_last_at_any_temperature(temperature):
    """EOS and EOT are the most confident proposals at half the positions; with
    confidence_eos_eot_inf every other proposal of the block is committed before any of them."""
    gen = torch.Generator().manual_seed(0)
    cfg = SampleConfig(gen_length=8, steps=8, block_length=8, temperature=temperature, confidence_eos_eot_inf=True)
    canvases = []
    model = preferring({EOS: 9.0, EOT: 8.5})
    out = generate(model, torch.randint(0, 200, (1, 2)), cfg, mask_id=MASK, eos_id=EOS, end_ids=[EOS, EOT],
                   generator=gen, on_step=lambda i, x: canvases.append(x[0, 2:].clone()))
    for x in canvases[:4]:  # the four positions that propose 'a' go first
        assert not torch.isin(x, torch.tensor([EOS, EOT])).any()
    assert torch.isin(out[0, 2:], torch.tensor([EOS, EOT])).sum() == 4
    generate(model, torch.randint(0, 200, (1, 2)), cfg.model_copy(update={"confidence_eos_eot_inf": False}),
                     mask_id=MASK, eos_id=EOS, generator=torch.Generator().manual_seed(0),
                     on_step=lambda i, x: canvases.append(x[0, 2:].clone()))
    assert torch.isin(canvases[8], torch.tensor([EOS, EOT])).any()  # without it, EOS/EOT go first


def test_logits_eos_inf_never_proposes_eos():
    cfg = SampleConfig(gen_length=8, steps=8, block_length=8, logits_eos_inf=True)
    out = generate(preferring({EOS: 9.0}), torch.randint(0, 200, (2, 2)), cfg, mask_id=MASK, eos_id=EOS)
    assert not (out == EOS).any() and not (out == MASK).any()


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt=torch.zeros(5, dtype=torch.long)), "batch, prompt_len"),
    (dict(max_length=10), "exceeds the model's context"),
    (dict(attention_mask=torch.tensor([[0, 1, 1]]), prompt=torch.tensor([[MASK, 1, 2]])), "pad id equals mask_id"),
    (dict(prompt=torch.tensor([[1, MASK, 2]])), "contains mask_id"),
    (dict(attention_mask=torch.tensor([[1, 0, 1]])), "left-padded"),
    (dict(cfg=SampleConfig(gen_length=8, steps=8, block_length=8, stop_at_eos=True)), "need eos_id"),
    (dict(cfg=SampleConfig(gen_length=8, steps=8, block_length=8, logits_eos_inf=True)), "need eos_id"),
])
def test_bad_settings_raise(model, kwargs, message):
    cfg = kwargs.pop("cfg", SampleConfig(gen_length=8, steps=8, block_length=8))
    prompt = kwargs.pop("prompt", torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, cfg, mask_id=MASK, **kwargs)


def test_bad_config_bypassing_validation_still_raises(model):
    cfg = SampleConfig.model_construct(gen_length=10, steps=4, block_length=4, temperature=0.0,
                                       remasking="low_confidence", cfg_scale=0.0, stop_at_eos=False)
    with pytest.raises(ValueError, match="not divisible by block_length"):
        generate(model, torch.tensor([[1, 2]]), cfg, mask_id=MASK)


def test_proposals_stay_inside_the_tokenizers_vocabulary():
    # A head wider than the tokenizer (the tiny preset: 264 logits, 259 byte ids) that prefers the
    # extra ids: without vocab_size the sampler commits ids nothing can decode.
    def wide(x, attention_mask=None):
        logits = torch.zeros(*x.shape, 264)
        logits[..., 260:] = 5.0
        logits[..., 65] = 1.0
        return logits

    cfg = SampleConfig(gen_length=8, steps=8, block_length=8, temperature=1.0)
    prompt = torch.tensor([[EOS, 70, 71]])
    unrestricted = generate(wide, prompt, cfg, mask_id=MASK, generator=torch.Generator().manual_seed(0))
    assert (unrestricted[0, 3:] >= 259).any()  # the defect this guards against
    x = generate(wide, prompt, cfg, mask_id=MASK, generator=torch.Generator().manual_seed(0), vocab_size=259)
    assert (x[0, 3:] < 259).all() and (x[0, 3:] != MASK).all()


def test_complete_texts_decodes_every_committed_token_and_refuses_mask_text(model):
    from dlm_ray.core.inference import complete_texts
    from dlm_ray.core.text import PromptError
    from dlm_ray.core.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    cfg = SampleConfig(gen_length=16, steps=16, block_length=16, temperature=1.0)
    out = complete_texts(model, tok, ["s31=", "r12="], cfg, seeds=[1, 2])
    for c in out:
        assert max(c.ids, default=0) < tok.vocab_size and tok.eos_id not in c.ids
        assert c.text == tok.decode(c.ids) and c.num_generated == 16
    # A row's completion does not depend on the prompts batched with it.
    alone = complete_texts(model, tok, ["r12="], cfg, seeds=[2])[0]
    assert alone.ids == out[1].ids
    with pytest.raises(PromptError, match="mask"):
        complete_texts(model, _MaskText(), ["x"], cfg, seeds=[0])


class _MaskText:
    """A tokenizer whose encoding of some text is the mask id: the prompt must be refused."""

    vocab_size, pad_id, eos_id, mask_id = 259, PAD, EOS, MASK

    def encode(self, text):
        return [MASK]


def test_rows_stopped_by_the_step_callback_leave_the_model_calls(model):
    seen_rows = []

    def counted(x, attention_mask=None):
        seen_rows.append(x.shape[0])
        return model(x, attention_mask)

    cfg = SampleConfig(gen_length=16, steps=16, block_length=16)
    prompts = torch.tensor([[EOS, 65, 66], [EOS, 67, 68]])
    alone = generate(model, prompts[1:], cfg, mask_id=MASK)
    x = generate(counted, prompts, cfg, mask_id=MASK, eos_id=EOS,
                 on_step=lambda i, x: torch.tensor([i == 2, False]))  # row 0 goes away after step 3
    assert seen_rows[:3] == [2, 2, 2] and set(seen_rows[3:]) == {1} and len(seen_rows) == 16
    assert (x[0, 3:] != MASK).all() and (x[0, 3:] == EOS).sum() >= 16 - 3
    assert torch.equal(x[1], alone[0])  # the other row is untouched
