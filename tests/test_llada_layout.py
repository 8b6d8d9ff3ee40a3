"""LLaDA's Hugging Face layout: import of a published-format directory, export, and bad directories."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from dlm_ray.io.checkpoint import CheckpointError, checkpoint_hash, load_inference, save_inference
from dlm_ray.config.schema import ModelConfig
from dlm_ray.io.llada_layout import from_llada_name, to_llada_name
from dlm_ray.core.model import Denoiser
from tests.llada_dir import EOS, EOT, MASK, SHAPE, llada_tensors, write_llada_dir


def reference_forward(t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's published architecture, from its tensors alone: pre-norm RMSNorm blocks, full
    (non-causal) multi-head attention with rotary positions (θ from the config, halves rotated),
    MLP ff_out(silu(ff_proj(h)) * up_proj(h)), final norm, untied head."""
    t = {k: v.float() for k, v in t.items()}
    D, H, eps = SHAPE["d_model"], SHAPE["n_heads"], SHAPE["rms_norm_eps"]
    K = D // H
    B, L = ids.shape

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    inv = 1.0 / SHAPE["rope_theta"] ** (torch.arange(0, K, 2).float() / K)
    ang = torch.arange(L).float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # x: B, H, L, K; rotate_half on the two halves
        x1, x2 = x[..., : K // 2], x[..., K // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = t["model.transformer.wte.weight"][ids]
    for i in range(SHAPE["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms(x, t[p + "attn_norm.weight"])
        q, k, v = (h @ t[p + n].T for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight"))
        q, k, v = (z.view(B, L, H, K).transpose(1, 2) for z in (q, k, v))
        q, k = rope(q), rope(k)
        att = (q @ k.transpose(-1, -2) / math.sqrt(K)).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, L, D) @ t[p + "attn_out.weight"].T
        h = rms(x, t[p + "ff_norm.weight"])
        x = x + (F.silu(h @ t[p + "ff_proj.weight"].T) * (h @ t[p + "up_proj.weight"].T)) @ t[p + "ff_out.weight"].T
    return rms(x, t["model.transformer.ln_f.weight"]) @ t["model.transformer.ff_out.weight"].T


def test_a_llada_directory_loads_and_matches_the_published_architecture(tmp_path):
    d = write_llada_dir(tmp_path / "llada")
    model, tok, meta = load_inference(d)
    assert meta["layout"] == "llada" and meta["model"]["vocab_size"] == SHAPE["embedding_size"]
    assert (tok.mask_id, tok.eos_id, tok.pad_id) == (MASK, EOS, EOS) and tok.end_ids == (EOS, EOT)
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_forward(llada_tensors(), ids), atol=2e-4, rtol=2e-4)
    bf16, _, _ = load_inference(d, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert torch.equal(bf16.blocks[1].mlp.ff_out.weight, llada_tensors()["model.transformer.blocks.1.ff_out.weight"])


def test_export_writes_llada_names_and_round_trips(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = Denoiser(ModelConfig(preset="tiny")).eval()
    x = torch.randint(0, 256, (2, 20))
    for dtype, shard_bytes in ((torch.float32, 1 << 30), (torch.float32, 200_000), (torch.bfloat16, 1 << 30)):
        out = tmp_path / f"{dtype}-{shard_bytes}"
        save_inference(model, {"kind": "byte"}, out, dtype=dtype, shard_bytes=shard_bytes)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model_type"] == "llada" and cfg["mask_token_id"] == 258 and cfg["dlm_ray"]["tokenizer"]["kind"] == "byte"
        files = sorted(out.glob("*.safetensors"))
        assert (len(files) > 1) == (shard_bytes < 1 << 30)
        assert (out / "model.safetensors.index.json").exists() == (len(files) > 1)
        names = set()
        for f in files:  # the safetensors library reads what we wrote
            with safe_open(str(f), framework="pt") as st:
                names |= set(st.keys())
        assert names == {to_llada_name(n) for n, _ in model.named_parameters()}
        assert "model.transformer.ff_out.weight" in names and "model.transformer.blocks.0.ff_out.weight" in names
        loaded, _, _ = load_inference(out, dtype=dtype)
        with torch.no_grad():
            expect = model.to(dtype)(x)
            assert torch.equal(loaded(x), expect)
        model = model.float()
    assert all(from_llada_name(to_llada_name(n)) == n for n, _ in model.named_parameters())


def test_old_exports_still_load(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = Denoiser(ModelConfig(preset="tiny")).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model": model.config.to_dict(), "diffusion": {},
                                                      "tokenizer": {"kind": "byte"}, "source": {"step": 7}}))
    loaded, tok, meta = load_inference(tmp_path)
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["layout"] == "legacy" and meta["source"]["step"] == 7 and tok.mask_id == 258
    assert len(checkpoint_hash(tmp_path)) == 16


@pytest.mark.parametrize("change, message", [
    ({"include_bias": True}, "include_bias = True is not supported"),
    ({"weight_tying": True}, "weight_tying = True"),
    ({"n_kv_heads": 2}, "grouped-query attention"),
    ({"block_type": "sequential"}, "block_type = 'sequential'"),
    ({"model_type": "gpt2"}, "neither a LLaDA config"),
    ({"d_model": 48}, "shape"),
])
def test_configurations_we_cannot_run_are_refused_by_name(tmp_path, change, message):
    d = write_llada_dir(tmp_path / "d", config=change)
    with pytest.raises(CheckpointError, match=message):
        load_inference(d)


def test_broken_directories_are_named_and_nothing_half_loads(tmp_path):
    d = write_llada_dir(tmp_path / "d")
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_inference(tmp_path)
    broken = shutil.copytree(d, tmp_path / "missing_shard")
    (broken / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors listed in .* is missing"):
        load_inference(broken)
    short = shutil.copytree(d, tmp_path / "truncated")
    f = short / "model-00001-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_inference(short)
    no_mask = tmp_path / "no_mask"
    write_llada_dir(no_mask, mask=False)
    with pytest.raises(CheckpointError, match="mask_id 261 is not a token of this tokenizer"):
        load_inference(no_mask)
    garbage = shutil.copytree(d, tmp_path / "garbage")
    (garbage / "model-00001-of-00002.safetensors").write_bytes(b"garbage!")
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: not a safetensors file"):
        load_inference(garbage)


def test_chat_is_rendered_with_the_models_template_markup_as_special_tokens(tmp_path):
    from dlm_ray.core.text import PromptError, encode_chat, encode_prompt

    _, tok, _ = load_inference(write_llada_dir(tmp_path / "d"))
    ids = encode_chat(tok, [{"role": "user", "content": "  Hi  "}])
    # <|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant...
    expect = [256, 259, *tok.encode("user"), 260, *tok.encode("\n\nHi"), EOT, 259, *tok.encode("assistant"), 260,
              *tok.encode("\n\n")]
    assert ids == expect
    assert EOT not in encode_prompt(tok, "a<|eot_id|>b")  # a plain prompt's text stays text
    for messages, message in [([], "non-empty list"), ([{"role": "bot", "content": "x"}], "role is 'bot'"),
                              ([{"role": "user", "content": 3}], "content must be a string"),
                              ([{"role": "user", "content": "<|mdm_mask|>"}], "special token text"),
                              ([{"role": "user", "content": "\ud800"}], "not valid Unicode")]:
        with pytest.raises(PromptError, match=message):
            encode_chat(tok, messages)
    _, plain, _ = load_inference(write_llada_dir(tmp_path / "no_template", chat_template=None))
    with pytest.raises(PromptError, match="no chat template"):
        encode_chat(plain, [{"role": "user", "content": "hi"}])
