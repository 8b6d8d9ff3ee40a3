"""Llama, Qwen2, Qwen3, Dream and A2D directories in and out, against transformers' own classes
(tiny random models built here; nothing downloaded): equal logits (float32, 1e-5) with and without
left padding, our exports loadable by ``AutoModelForCausalLM``, the kind never guessed, settings we
cannot run refused by name, and the mask token added to an autoregressive tokenizer with its rows
grown as the mean of the existing ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dlm_ray.config.schema import ModelConfig
from dlm_ray.core.model import Denoiser
from dlm_ray.io.checkpoint import CheckpointError, load_inference, read_inference_config, save_inference
from tests.conftest import QWEN_SHAPE, family_model
from tests.hf_dirs import NUM_TOKENS, batch, hf_model, reference_logits, save_hf

TOL = 1e-5


def real_error(ours: torch.Tensor, ref: torch.Tensor, am: torch.Tensor) -> float:
    """Largest absolute difference over the real positions (padding's logits mean nothing)."""
    return (ours[:, :, :ref.shape[-1]] - ref)[am.bool()].abs().max().item()


def same_shape(a: ModelConfig, b: ModelConfig) -> bool:
    return a.model_dump(exclude={"preset", "init_std"}) == b.model_dump(exclude={"preset", "init_std"})


def shifted(logits_BLV: torch.Tensor) -> torch.Tensor:
    """Dream's shift: position i reads the logits of i - 1; position 0 keeps its own."""
    return torch.cat([logits_BLV[:, :1], logits_BLV[:, :-1]], 1)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_hugging_face_directory_loads_with_transformers_logits(tmp_path, family, padded):
    ref_model = hf_model(family)
    # Qwen2's in many small shards with an index; the others in one file.
    d = save_hf(ref_model, tmp_path / family, max_shard_size="20KB" if family == "qwen2" else None)
    assert (d / "model.safetensors.index.json").is_file() == (family == "qwen2")
    model, tok, meta = load_inference(d)
    assert meta["layout"] == family and model.causal and meta["model"]["attention"] == "causal"
    cfg = model.config
    assert (cfg.kv_heads, cfg.qkv_bias, cfg.qk_norm, cfg.tie_embeddings) == (
        2, family == "qwen2", family == "qwen3", family != "llama")
    assert cfg.head_size == (32 if family == "qwen3" else 16)
    assert cfg.rope_theta == (500000.0 if family == "llama" else 10000.0)
    ids, am = batch(padded=padded)
    with torch.no_grad():
        err = real_error(model(ids, am), reference_logits(ref_model, ids, am), am)
    assert err < TOL, f"{family}: max |ours - transformers| = {err:.2e}"
    # An autoregressive tokenizer has no mask token: <|mask|> is added at the first free id; the
    # model used as it is keeps its own vocabulary.
    assert tok.mask_id == NUM_TOKENS and meta["mask_token"] == {
        "id": NUM_TOKENS, "added": True, "vocab_size": max(cfg.vocab_size, NUM_TOKENS + 1)}


@pytest.mark.parametrize("padded", [False, True])
def test_a_dream_directory_is_a_shifted_bidirectional_qwen2(tmp_path, padded):
    ref_model = hf_model("qwen2", tie_word_embeddings=False)
    d = save_hf(ref_model, tmp_path / "dream", mask=True,
                config={"model_type": "Dream", "architectures": ["DreamModel"], "mask_token_id": NUM_TOKENS})
    model, tok, meta = load_inference(d)
    assert meta["layout"] == "Dream" and tok.mask_id == NUM_TOKENS and not meta["mask_token"]["added"]
    assert model.config.attention == "full" and model.config.shift_logits and model.config.qkv_bias
    ids, am = batch(padded=padded)
    with torch.no_grad():
        ours = model(ids, am)
    want = shifted(reference_logits(ref_model, ids, am, bidirectional=True))
    # A left-padded row's first real token reads a padding position's state, as Dream's own shift
    # does; only positions whose predecessor is real are compared.
    comparable = am.bool() & torch.cat([torch.ones_like(am[:, :1]), am[:, :-1]], 1).bool()
    assert real_error(ours, want, comparable) < TOL
    with pytest.raises(CheckpointError, match="the checkpoint says attention = 'full'.*kind 'causal' contradicts"):
        load_inference(d, kind="causal")


def test_an_a2d_directory_needs_its_kind_named_and_a_plain_one_may_be_named(tmp_path):
    ref_model = hf_model("qwen3")
    d = save_hf(ref_model, tmp_path / "a2d", mask=True,
                config={"model_type": "a2d-qwen3", "architectures": ["A2DQwen3LMHeadModel"]})
    with pytest.raises(CheckpointError, match="does not say whether the model is masked diffusion or block"):
        load_inference(d)
    ids, am = batch(padded=True)
    model, tok, _ = load_inference(d, kind="full")
    assert tok.mask_id == NUM_TOKENS and not model.config.shift_logits  # dllm's A2D models: no shift
    with torch.no_grad():
        assert real_error(model(ids, am), reference_logits(ref_model, ids, am, bidirectional=True), am) < TOL
    block, _, _ = load_inference(d, kind="block_causal:4")
    first = torch.ones_like(am[:, :4])
    with torch.no_grad():  # the first block sees itself only
        assert real_error(block(ids[:, :4]), reference_logits(ref_model, ids[:, :4], first, bidirectional=True),
                          first) < TOL
    plain = save_hf(ref_model, tmp_path / "plain_qwen3", mask=True)  # a diffusion model in a plain Qwen3 dir
    assert load_inference(plain, kind="full")[0].config.attention == "full"
    no_mask = save_hf(ref_model, tmp_path / "no_mask")
    with pytest.raises(CheckpointError, match="the tokenizer has no mask token"):
        load_inference(no_mask, kind="full")


@pytest.mark.parametrize("shape, model_type", [
    ({}, "llama"), ({"n_kv_heads": 2, "qkv_bias": True, "tie_embeddings": True}, "qwen2"),
    ({k: v for k, v in QWEN_SHAPE.items() if k != "shift_logits"}, "qwen3")])
def test_our_autoregressive_export_loads_in_transformers_with_equal_logits(tiny_cfg, tmp_path, shape, model_type):
    from transformers import AutoModelForCausalLM

    shape = {**shape, "vocab_size": NUM_TOKENS}
    model = family_model(tiny_cfg, "llada", attention="causal", init_std=0.2, **shape).eval()
    out = save_inference(model, {"kind": "byte"}, tmp_path / "ar")
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    theirs = AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    ids, am = batch(padded=True)
    with torch.no_grad():
        assert real_error(model(ids, am), reference_logits(theirs, ids, am), am) < TOL
        back = load_inference(out)[0]
        assert torch.equal(back(ids, am), model(ids, am)) and same_shape(back.config, model.config)


def test_a_llama_directory_exports_back_with_its_mask_token_recorded(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = save_hf(hf_model("llama"), tmp_path / "llama")
    model, tok, meta = load_inference(d)
    spec = {**meta["tokenizer"], "path": str(d / "tokenizer.json")}
    out = save_inference(model, spec, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["mask_token_id"] == NUM_TOKENS and cfg["eos_token_id"] == 257
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.mask_token == "<|mask|>" and hf_tok.convert_tokens_to_ids("<|mask|>") == NUM_TOKENS
    theirs = AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    ids, am = batch(padded=True)
    with torch.no_grad():
        assert real_error(model(ids, am), reference_logits(theirs, ids, am), am) < TOL
    _, again, meta2 = load_inference(out)  # the token is the tokenizer's own now
    assert again.mask_id == NUM_TOKENS and meta2["mask_token"]["added"] is False


def test_a_diffusion_model_exports_in_llada_dream_or_a2d_layout(tiny_cfg, tmp_path):
    from transformers import Qwen2ForCausalLM

    cases = [({}, "llada"), ({"n_kv_heads": 2, "tie_embeddings": True, "shift_logits": True}, "Dream"),
             ({"n_kv_heads": 2}, "a2d-llama"), (QWEN_SHAPE, "a2d-qwen3"),
             ({"qkv_bias": True, "attention": "block_causal", "block_size": 4}, "a2d-qwen2")]
    ids, am = batch(padded=True)
    for shape, model_type in cases:
        model = family_model(tiny_cfg, "llada", init_std=0.2, vocab_size=NUM_TOKENS + 1, **shape).eval()
        out = save_inference(model, {"kind": "byte"}, tmp_path / model_type)
        assert json.loads((out / "config.json").read_text())["model_type"] == model_type
        back = load_inference(out)[0]
        with torch.no_grad():
            assert torch.equal(back(ids, am), model(ids, am)) and same_shape(back.config, model.config), model_type
    # Dream's tensors are Qwen2's (zero q/k/v biases written for a model without them).
    dream = tmp_path / "as_qwen2"
    shutil.copytree(tmp_path / "Dream", dream)
    (dream / "config.json").write_text(json.dumps({**json.loads((dream / "config.json").read_text()),
                                                   "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    theirs = Qwen2ForCausalLM.from_pretrained(str(dream)).float().eval()
    model = load_inference(tmp_path / "Dream")[0]
    comparable = am.bool() & torch.cat([torch.ones_like(am[:, :1]), am[:, :-1]], 1).bool()
    with torch.no_grad():
        want = shifted(reference_logits(theirs, ids, am, bidirectional=True))
        assert real_error(model(ids, am), want, comparable) < TOL


@pytest.mark.parametrize("family, change, key", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4}, "use_sliding_window = True"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters"),
    ("llama", {"mlp_bias": True}, "mlp_bias = True"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ("qwen2", {"num_experts": 8}, "num_experts = 8"),
])
def test_settings_we_cannot_run_are_refused_by_name(tmp_path, family, change, key):
    d = save_hf(hf_model(family), tmp_path / family, config=change)
    with pytest.raises(CheckpointError, match=key.replace("(", r"\(")):
        load_inference(d)


def test_an_attention_output_bias_is_refused_unless_it_is_zero(tmp_path):
    ref_model = hf_model("llama", attention_bias=True)  # q/k/v/o biases, o random
    with pytest.raises(CheckpointError, match=r"self_attn\.o_proj\.bias is not zero"):
        load_inference(save_hf(ref_model, tmp_path / "biased"))
    with torch.no_grad():
        for layer in ref_model.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    model, _, _ = load_inference(save_hf(ref_model, tmp_path / "zero"))
    ids, am = batch(padded=True)
    assert model.config.qkv_bias
    with torch.no_grad():
        assert real_error(model(ids, am), reference_logits(ref_model, ids, am), am) < TOL


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_init_from_an_autoregressive_directory_adds_the_mask_rows_as_the_mean(tmp_path, family):
    """Llama's vocabulary is the tokenizer's: the mask token takes a new row. Qwen2's has spare
    rows: the mask token's row is one of them, reset to the mean for a diffusion run only."""
    from dlm_ray.train.engine import _read_init_from

    ref_model = hf_model(family)
    d = save_hf(ref_model, tmp_path / family)
    meta, tok = read_inference_config(d)
    want_wte = ref_model.model.embed_tokens.weight.detach()
    want_head = ref_model.lm_head.weight.detach()
    mean_wte, mean_head = want_wte[:NUM_TOKENS].mean(0), want_head[:NUM_TOKENS].mean(0)
    for attention in ("full", "causal"):
        cfg = ModelConfig.model_validate({**meta["model"], "attention": attention,
                                          "vocab_size": meta["mask_token"]["vocab_size"],
                                          "shift_logits": attention != "causal"})
        model = Denoiser.empty(cfg, device="cpu", dtype=torch.float32)
        _read_init_from(model, str(d), partitioned=False)
        mask = tok.mask_id
        spare = family == "qwen2" and attention == "causal"  # an AR run leaves the spare row as it was
        for got, want, mean in ((model.wte.weight, want_wte, mean_wte), (model.lm_head.weight, want_head, mean_head)):
            n = want.shape[0]
            assert got.shape[0] == max(n, mask + 1)
            assert torch.equal(got[:mask], want[:mask]) and torch.equal(got[mask + 1:n], want[mask + 1:n])
            torch.testing.assert_close(got[mask], want[mask] if spare else mean, atol=0, rtol=0)


# ------------------------------------------------------------------- DeepSpeed: ZeRO-3 and jobs/export.py


def _grown_under_zero3(rank: int, d, grown: dict) -> None:
    from dlm_ray.config.schema import PretrainConfig
    from dlm_ray.train.engine import _read_init_from, build_model, deepspeed_config
    from tests.test_engine import full_weights

    world = torch.distributed.get_world_size()
    cfg = PretrainConfig.model_validate({"model": grown, "init_from": str(d), "data": {"seq_len": 64},
                                         "train": {"num_workers": world, "batch_size": world, "zero_stage": 3}})
    model = build_model(cfg, ds_config=deepspeed_config(cfg.train, use_gpu=False), device=torch.device("cpu"),
                        resume=False)
    assert all(p.numel() == 0 for p in model.parameters())  # no rank holds a parameter whole
    whole = Denoiser.empty(cfg.model, device="cpu", dtype=torch.float32)
    _read_init_from(whole, str(d), partitioned=False)
    got, want = full_weights(model), dict(whole.named_parameters())
    for name, w in want.items():  # the mean summed in another order: equal to float32 rounding
        torch.testing.assert_close(got[name], w, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_ranks_grow_the_vocabulary_from_their_own_partitions(tmp_path):
    """Three ranks, a Llama directory whose vocabulary is its tokenizer's: the mask row is new."""
    from tests.test_engine import run_ranks

    d = save_hf(hf_model("llama"), tmp_path / "llama")
    meta, _ = read_inference_config(d)
    grown = {**meta["model"], "attention": "full", "shift_logits": True, "max_seq_len": 64,
             "vocab_size": meta["mask_token"]["vocab_size"]}
    run_ranks(3, _grown_under_zero3, d, grown)


def _train_and_save(rank: int, tmp_path) -> None:
    import deepspeed

    from dlm_ray.config.schema import PretrainConfig
    from dlm_ray.io.checkpoint import save_training
    from dlm_ray.train.engine import deepspeed_config

    shape = {k: v for k, v in QWEN_SHAPE.items() if k != "shift_logits"}
    cfg = PretrainConfig.model_validate({
        "model": {"preset": "tiny", "d_model": 64, "n_layers": 2, "n_heads": 4, "d_mlp": 128, "max_seq_len": 64,
                  "attention": "causal", **shape},
        "data": {"seq_len": 64}, "train": {"num_workers": 1, "batch_size": 2, "zero_stage": 3}})
    model = family_model(cfg.model, "llada")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(cfg.train, use_gpu=False))
    ids, am = batch(padded=True)
    loss = engine(ids, am).logsumexp(-1).mean()  # one step: the export is of trained weights
    engine.backward(loss)
    engine.step()
    state = {"step": 1, "tokens_seen": 24, "epoch": 0, "batches_into_epoch": 1, "history": []}
    save_training(tmp_path / "ck", engine, rank=rank, state=state, cfg=cfg)
    engine.eval()
    with torch.no_grad():
        torch.save(engine.module(ids, am), tmp_path / "logits.pt")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_jobs_export_of_an_autoregressive_run_loads_in_transformers(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from tests.test_engine import run_ranks

    run_ranks(1, _train_and_save, tmp_path)
    root = Path(__file__).resolve().parents[1]  # the job of this tree, with this tree's package
    subprocess.run([sys.executable, "jobs/export.py", str(tmp_path / "ck"), str(tmp_path / "export")], check=True,
                   capture_output=True, timeout=240, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "qwen3"
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).float().eval()
    ids, am = batch(padded=True)
    err = real_error(torch.load(tmp_path / "logits.pt"), reference_logits(theirs, ids, am), am)
    assert err < TOL, f"max |engine - transformers| = {err:.2e}"


@pytest.mark.parametrize("padded", [False, True])
def test_llama3_rope_scaling_loads_and_exports_with_transformers_logits(tmp_path, padded):
    """Llama 3.1 / 3.2's rescaled rotary frequencies: an original context of 8 makes every band
    (stretched, blended, kept) occur at this head width, so a wrong formula shows in the logits."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
    ref_model = hf_model("llama", rope_scaling=dict(scaling))  # transformers adds rope_theta to it
    model, _, meta = load_inference(save_hf(ref_model, tmp_path / "llama3"))
    assert meta["model"]["rope_scaling"] == scaling  # read from rope_parameters (transformers 5 writes it)
    ids, am = batch(padded=padded, L=24)
    with torch.no_grad():
        want = reference_logits(ref_model, ids, am)
        assert real_error(model(ids, am), want, am) < TOL
        plain = Denoiser(model.config.model_copy(update={"rope_scaling": None}))
        plain.load_state_dict(model.state_dict())
        assert real_error(plain(ids, am), want, am) > 1e-3  # the scaling is not a no-op here
    from transformers import AutoModelForCausalLM

    out = save_inference(model, {"kind": "byte"}, tmp_path / "export")
    theirs = AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    assert real_error(reference_logits(theirs, ids, am), want, am) < TOL


def test_batch_generation_runs_a_checkpoint_as_the_kind_the_job_names(tmp_path):
    """An A2D directory cannot say its kind: jobs/generate.py (and Serve) take it as ``model_kind``;
    without it the job is refused by name, and the kind is part of the job's identity (a rerun
    with another kind cannot resume into the same output)."""
    from dlm_ray.config.inference import GenerateConfig
    from dlm_ray.config.io import load_config
    from dlm_ray.serving.batch import Completer, _job_identity

    d = save_hf(hf_model("qwen3"), tmp_path / "a2d", mask=True,
                config={"model_type": "a2d-qwen3", "architectures": ["A2DQwen3LMHeadModel"]})
    unnamed = GenerateConfig(checkpoint=str(d))
    with pytest.raises(CheckpointError, match="does not say whether the model is masked diffusion or block"):
        Completer(unnamed.to_dict(), "hash")
    named = load_config(GenerateConfig, None, [f"--checkpoint={d}", "--model_kind=block_causal:4"])
    completer = Completer(named.to_dict(), "hash")
    assert completer.model.block_causal and completer.model.config.block_size == 4
    assert _job_identity(named, "hash") != _job_identity(named.model_copy(update={"model_kind": "full"}), "hash")
