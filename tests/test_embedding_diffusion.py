"""Embedding diffusion (``model.noise: gaussian``): the forward process, the loss, self-conditioning,
the bound and the ODE sampler, on tiny random models (pure torch)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlm_ray.config.schema import DiffusionConfig, ModelConfig, PretrainConfig, SampleConfig
from dlm_ray.core import embedding_diffusion as ed
from dlm_ray.core.kinds import EmbeddingDiffusion, kind_of
from dlm_ray.core.model import Denoiser
from dlm_ray.core.sampling import generate, infill

MASK, EOS, V = 259, 257, 264


@pytest.fixture
def cfg(tiny_cfg) -> ModelConfig:
    return tiny_cfg.model_copy(update={"noise": "gaussian", "d_model": 32, "n_layers": 2, "d_mlp": 64})


@pytest.fixture
def model(cfg) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(cfg).eval()


def inputs_of(model: Denoiser) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """Every call's (z, t, estimate, transformer input) recorded from the noise input module."""
    seen: list = []
    handle = model.noise_in.register_forward_hook(lambda mod, args, out: seen.append((*args, out)))
    return seen, handle


class Oracle(Denoiser):
    """Logits that put ``margin`` on the clean token everywhere (``margin`` 0: uniform)."""

    margin = 60.0

    def denoise_embeddings(self, input_ids_BL, attention_mask_BL, noise_level_BL, **kwargs):  # type: ignore[override]
        return self.margin * F.one_hot(input_ids_BL, self.config.vocab_size).float()


# ------------------------------------------------------------------------------------ forward process


def test_the_forward_process_has_the_lines_mean_and_variance(model, cfg):
    """z_t given t: mean t·e and variance (1 − t)² per coordinate, e of length sqrt(D)."""
    ids = torch.tensor([[5, 70, 200, 12]])
    e = model.wte(ids, "normalised")[0]
    assert torch.allclose(e.norm(dim=-1), torch.full((4,), math.sqrt(cfg.d_model)), rtol=1e-5)
    t = torch.tensor([[0.0, 0.3, 0.8, 1.0]])
    seen, handle = inputs_of(model)
    n = 4000
    with torch.no_grad():
        model(ids.expand(n, 4), None, noise_level=t.expand(n, 4), noise=torch.randn(n, 4, cfg.d_model))
    handle.remove()
    z = seen[0][0]
    assert torch.allclose(z.mean(0), t[0, :, None] * e, atol=4 / math.sqrt(n))
    assert torch.allclose(z.var(0).mean(-1), (1 - t[0]) ** 2, rtol=0.05, atol=1e-6)
    assert torch.equal(z[:, 3], e[3].expand(n, -1))  # level 1: the clean embedding itself


def test_training_levels_are_spread_over_the_batch_and_shifted():
    noised = torch.ones(64, 8, dtype=torch.bool)
    noised[:, 6:] = False
    got = ed.training_inputs(noised, d_model=16, time_shift=3.0, generator=torch.Generator().manual_seed(0))
    t_B = got["noise_level"][:, 0]
    # One level per row, 1 where nothing is noised; the levels are the shift of one point in each
    # of 64 equal slices of [0, 1) (low-discrepancy).
    assert torch.equal(got["noise_level"][:, :6], t_B[:, None].expand(64, 6)) and (got["noise_level"][:, 6:] == 1).all()
    u = torch.sort(t_B / (t_B + (1 - t_B) / 3.0)).values  # the inverse of shift(u, 3)
    assert ((u * 64).floor() == torch.arange(64)).all()
    assert float(ed.shift(torch.tensor(0.5), 3.0)) == pytest.approx(0.25)
    assert got["noise"].shape == (64, 8, 16) and got["self_condition"].dtype == torch.bool
    assert 16 < int(got["self_condition"].sum()) < 48


def test_prompts_and_padding_are_never_noised_in_training(model, cfg):
    ids = torch.randint(0, 250, (4, 12))
    am = torch.ones_like(ids)
    am[2, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": am, "prompt_len": torch.tensor([3, 0, 5, 11]),
             "answer_len": torch.tensor([9, 12, 4, 1])}
    noised = ed.noised_positions(batch)
    assert noised.sum(-1).tolist() == [9, 12, 4, 1]
    # A conditional pretraining document's prompt (the pipeline's ``given``) stays clean as well.
    given = torch.zeros_like(ids)
    given[1, :4] = 1
    assert ed.noised_positions({**batch, "given": given}).sum(-1).tolist() == [9, 8, 4, 1]
    seen, handle = inputs_of(model)
    kind_of(cfg).loss(model.train(), batch, mask_id=MASK)
    handle.remove()
    e = model.wte(ids, "normalised")
    for z, t, *_ in seen:  # both passes of a self-conditioned step
        assert (t[~noised] == 1).all() and (t[noised] < 1).all()
        assert torch.equal(z[~noised], e[~noised])


# ----------------------------------------------------------------------------------------- the loss


def test_a_model_that_predicts_the_truth_has_near_zero_loss(cfg):
    oracle = Oracle(cfg)
    ids = torch.randint(0, 250, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert float(kind_of(cfg).loss(oracle, batch, mask_id=MASK)) < 1e-6
    oracle.margin = 0.0  # uniform logits: log of the V - 1 tokens other than the mask
    assert float(kind_of(cfg).loss(oracle, batch, mask_id=MASK)) == pytest.approx(math.log(V - 1), rel=1e-5)


def test_the_loss_trains_and_reaches_the_embeddings(cfg):
    torch.manual_seed(1)
    model = Denoiser(cfg).train()
    ids = torch.randint(0, 250, (8, 16))
    noised = torch.ones(8, 16, dtype=torch.bool)
    noise = {**ed.training_inputs(noised, d_model=cfg.d_model, time_shift=2.0),
             "self_condition": torch.arange(8) % 2 == 0}
    ed.token_loss(model(ids, None, **noise), ids, noised, noised.sum(), mask_id=MASK).backward()
    for name in ("wte.weight", "noise_in.time_in.weight", "noise_in.self_cond.weight", "blocks.0.attn.q_proj.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------- self-conditioning


def test_self_conditioning_changes_the_input_only_when_on(model, cfg):
    ids = torch.randint(0, 250, (3, 10))
    t = torch.full((3, 10), 0.4)
    t[:, :4] = 1.0  # a given prompt
    noise = torch.randn(3, 10, cfg.d_model)
    with torch.no_grad():
        plain = model(ids, None, noise_level=t, noise=noise)
        assert torch.equal(model(ids, None, noise_level=t, noise=noise, self_condition=torch.zeros(3, dtype=torch.bool)),
                           plain)
        seen, handle = inputs_of(model)
        on = model(ids, None, noise_level=t, noise=noise, self_condition=torch.tensor([True, False, True]))
        handle.remove()
    first, second = seen  # the estimating pass, then the pass that reads the estimate
    assert first[2] is None and second[2] is not None
    changed = (second[3] != first[3]).any(-1)  # [B, L]: which positions' inputs differ
    assert changed[[0, 2], 4:].all() and not changed[1].any() and not changed[:, :4].any()
    assert torch.equal(on[1], plain[1]) and not torch.allclose(on[0], plain[0])
    # The estimate is the expectation of the normalised embeddings under the first pass's prediction.
    with torch.no_grad():
        expect = model.wte(model(ids, None, noise_level=t, noise=noise).softmax(-1), "expected")
    assert torch.allclose(second[2][0], expect[0], atol=1e-5) and (second[2][1] == 0).all()


# ------------------------------------------------------------------------------------------- bound


def test_the_bound_of_a_perfect_model_is_its_unsampled_remainder_alone(cfg):
    oracle = Oracle(cfg).eval()
    ids = torch.randint(0, 250, (2, 12))
    nelbo = ed.gaussian_nelbo(oracle, ids, mask_id=MASK, num_samples=4)
    assert torch.allclose(nelbo, torch.full((2,), 0.5 * math.exp(ed.LAMBDA_MIN) * 4 * cfg.d_model), rtol=1e-3)


def test_the_bound_of_uniform_logits_matches_its_closed_form(cfg):
    """ê is then the mean normalised embedding ē for every z: the integral is ½(e^λmax − e^λmin)‖e − ē‖²
    per position, plus the remainder's bound and log(V − 1) from the decoder."""
    oracle = Oracle(cfg).eval()
    oracle.margin = 0.0
    ids = torch.randint(0, 250, (2, 12))
    e = oracle.wte(ids, "normalised")
    mean = oracle.wte(torch.full((V,), 1.0 / V), "expected")
    sq = (e - mean).pow(2).sum(-1).mean(-1)
    want = 0.5 * (math.exp(ed.LAMBDA_MAX) - math.exp(ed.LAMBDA_MIN)) * sq + 2 * math.exp(ed.LAMBDA_MIN) * cfg.d_model \
        + math.log(V - 1)
    got = ed.gaussian_nelbo(oracle, ids, mask_id=MASK, num_samples=400, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(got.double(), want.double(), rtol=0.02)


def test_the_bound_scores_only_the_answer_given_the_prompt(model):
    ids = torch.randint(0, 250, (2, 12))
    answer = torch.zeros(2, 12, dtype=torch.bool)
    answer[:, 6:] = True
    gen = torch.Generator().manual_seed(0)
    seen, handle = inputs_of(model)
    ed.gaussian_nelbo(model, ids, mask_id=MASK, num_samples=2, maskable=answer, generator=gen)
    handle.remove()
    assert all((t[:, :6] == 1).all() and (t[:, 6:] < 1).all() for _, t, *_ in seen)
    with pytest.raises(ValueError, match="no token to score"):
        ed.gaussian_nelbo(model, ids, mask_id=MASK, num_samples=1, maskable=torch.zeros_like(answer))


# ------------------------------------------------------------------------------------------ sampling


def gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


SAMPLE = SampleConfig(gen_length=12, steps=6, block_length=12)


def test_sampling_is_deterministic_per_seed_and_batched_rows_equal_rows_alone(model):
    prompts = [[5, 6, 7, 8, 9], [40, 41], [100, 101, 102]]
    width = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (width - len(p)) + p for p in prompts])
    am = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = generate(model, ids, SAMPLE, mask_id=MASK, attention_mask=am, generator=gens([1, 2, 3]))
    again = generate(model, ids, SAMPLE, mask_id=MASK, attention_mask=am, generator=gens([1, 2, 3]))
    assert torch.equal(batch, again)
    for i, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), SAMPLE, mask_id=MASK, generator=gens([i + 1]))
        assert torch.equal(alone[0, len(p):], batch[i, width:]), i
    other = generate(model, ids, SAMPLE, mask_id=MASK, attention_mask=am, generator=gens([7, 8, 9]))
    assert not torch.equal(other, batch)
    assert (batch[:, width:] != MASK).all()


def test_the_prompt_stays_clean_at_every_step_and_the_canvas_fills_at_the_last(model, cfg):
    prompt = torch.tensor([[EOS, 10, 11, 12], [20, 21, 22, 23]])
    am = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    seen, handle = inputs_of(model)
    canvases, stats = [], {}
    generate(model, prompt, SAMPLE, mask_id=MASK, attention_mask=am, generator=gens([0, 1]), stats=stats,
             on_step=lambda i, x: canvases.append(x.clone()))
    handle.remove()
    assert stats["model_calls"] == len(seen) == SAMPLE.steps == len(canvases)
    e = model.wte(prompt, "normalised")
    levels = []
    for z, t, _, _ in seen:
        assert torch.equal(z[:, :4], e) and (t[:, :4] == 1).all()
        levels.append(float(t[0, 4]))
    assert (seen[0][2] is None) and all(s[2] is not None for s in seen[1:])  # self-conditioned after the first
    want = ed.shift(torch.arange(SAMPLE.steps, dtype=torch.float64) / SAMPLE.steps, cfg.gaussian_time_shift)
    assert levels == pytest.approx(want.tolist(), rel=1e-6)
    assert all((c[:, 4:] == MASK).all() for c in canvases[:-1]) and (canvases[-1][:, 4:] != MASK).all()


def test_stop_at_eos_trims_after_the_first_end_token(model):
    prompt = torch.tensor([[1, 2, 3]])
    plain = generate(model, prompt, SAMPLE, mask_id=MASK, eos_id=EOS, generator=gens([3]), vocab_size=V)
    # An EOS proposed mid-answer: force it by running with an eos id the answer holds.
    eos = int(plain[0, 6])
    trimmed = generate(model, prompt, SAMPLE.model_copy(update={"stop_at_eos": True}), mask_id=MASK, eos_id=eos,
                       generator=gens([3]), vocab_size=V)
    first = int((plain[0, 3:] == eos).nonzero()[0])
    assert torch.equal(trimmed[0, :3 + first + 1], plain[0, :3 + first + 1])
    assert (trimmed[0, 3 + first + 1:] == eos).all()


def test_rows_stopped_by_the_callback_leave_the_calls(model):
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    batch_sizes = []

    def on_step(i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([i == 1, False])

    handle = model.register_forward_pre_hook(lambda mod, args: batch_sizes.append(args[0].shape[0]))
    out = generate(model, prompt, SAMPLE, mask_id=MASK, eos_id=EOS, generator=gens([0, 1]), on_step=on_step)
    handle.remove()
    assert batch_sizes == [2, 2] + [1] * (SAMPLE.steps - 2)
    alone = generate(model, prompt[1:], SAMPLE, mask_id=MASK, eos_id=EOS, generator=gens([1]))
    assert (out[0, 3:] == EOS).all() and torch.equal(out[1], alone[0])


def test_temperature_draws_the_tokens_from_the_last_logits(model):
    prompt = torch.tensor([[1, 2, 3]])
    hot = SAMPLE.model_copy(update={"temperature": 1.0})
    a = generate(model, prompt, hot, mask_id=MASK, generator=gens([5]))
    assert torch.equal(a, generate(model, prompt, hot, mask_id=MASK, generator=gens([5])))
    assert not torch.equal(a, generate(model, prompt, SAMPLE, mask_id=MASK, generator=gens([5])))


# --------------------------------------------------------------------------------------- the kind


def test_the_kind_resolves_one_block_and_refuses_what_an_ode_cannot_use(model, cfg):
    kind = kind_of(cfg)
    assert isinstance(kind, EmbeddingDiffusion) and not kind.masked_training and not kind.can_infill
    ran = kind.resolve(SampleConfig(gen_length=32, steps=16, block_length=8))
    assert (ran.block_length, ran.steps) == (32, 16)
    for bad, fragment in [({"threshold": 0.9}, "threshold"), ({"cache": "dual"}, "cache='dual'"),
                          ({"cfg_scale": 1.0}, "cfg_scale"), ({"entropy_bound": 1.0}, "entropy_bound"),
                          ({"remasking": "random"}, "remasking")]:
        with pytest.raises(ValueError, match=fragment):
            kind.resolve(SampleConfig(gen_length=32, steps=16, block_length=32, **bad))
    with pytest.raises(ValueError, match="block_length must equal gen_length"):
        generate(model, torch.tensor([[1, 2]]), SampleConfig(gen_length=8, steps=4, block_length=4), mask_id=MASK)
    with pytest.raises(ValueError, match="infilling is not built"):
        infill(model, torch.tensor([[1, MASK, 3]]), SampleConfig(gen_length=8, steps=4, block_length=8), mask_id=MASK)
    with pytest.raises(ValueError, match="reads noisy embeddings"):
        model(torch.tensor([[1, 2]]))
    # Serve's health check asks the kind for a call the model answers.
    assert kind.probe(model, torch.tensor([[1, 2]])).shape == (1, 2, cfg.vocab_size)


def test_configs_refuse_what_embedding_diffusion_cannot_be():
    with pytest.raises(ValueError, match="needs attention: full"):
        ModelConfig(preset="tiny", noise="gaussian", attention="block_causal")
    with pytest.raises(ValueError, match="masked diffusion"):
        PretrainConfig(model=ModelConfig(preset="tiny", noise="gaussian"), diffusion=DiffusionConfig(cap_weight=1.0))
    assert ModelConfig(preset="tiny", noise="gaussian").gaussian_time_shift == pytest.approx(10.0)
    assert ModelConfig(preset="small", noise="gaussian").gaussian_time_shift == pytest.approx(10 * math.sqrt(6))
    assert ModelConfig(preset="tiny", noise="gaussian", time_shift=2.0).gaussian_time_shift == 2.0


def test_the_kind_round_trips_through_an_export_in_llada_s_layout_only(model, cfg, tmp_path):
    from dlm_ray.io.checkpoint import load_inference, save_inference
    from dlm_ray.io.hf_layout import export_type
    from dlm_ray.io.llada_layout import LayoutError

    out = save_inference(model, {"kind": "byte"}, tmp_path / "emb")
    loaded, _, meta = load_inference(str(out))
    assert isinstance(kind_of(loaded.config), EmbeddingDiffusion) and meta["model"]["noise"] == "gaussian"
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(generate(loaded, prompt, SAMPLE, mask_id=MASK, generator=gens([4])),
                       generate(model, prompt, SAMPLE, mask_id=MASK, generator=gens([4])))
    assert export_type(cfg) is None  # LLaDA's layout holds it
    with pytest.raises(LayoutError, match="LLaDA's layout only"):
        export_type(cfg.model_copy(update={"n_kv_heads": 2}))
