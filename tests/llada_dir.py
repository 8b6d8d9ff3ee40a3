"""A tiny checkpoint directory in LLaDA's published layout, written with the safetensors and
tokenizers libraries (not with dlm_ray), for the import, chat and fine-tuning tests.

Byte-level BPE (no merges: 256 byte tokens), then LLaDA's special tokens; pad and EOS are one token
as in LLaDA; the embedding is wider than the tokenizer, as LLaDA's is (126464 rows for ~126350 ids).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|mdm_mask|>"]
BOS, EOS, EOT, MASK = 256, 257, 258, 261
# The Llama-3 style template LLaDA-Instruct ships (its facts: BOS first, a header per turn, EOT ends a
# turn, the generation prompt is the assistant header), written here for the tests.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SHAPE = dict(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=64, vocab_size=262, embedding_size=264,
             max_sequence_length=128, rope_theta=500000.0, rms_norm_eps=1e-5)


def write_tokenizer(directory: Path, *, chat_template: str | None = CHAT_TEMPLATE, mask: bool = True) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIALS if mask else SPECIALS[:-1]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def llada_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights under LLaDA's tensor names, for ``SHAPE``."""
    g = torch.Generator().manual_seed(seed)
    D, F, V = SHAPE["d_model"], SHAPE["mlp_hidden_size"], SHAPE["embedding_size"]

    def w(*shape: int, std: float = 0.1) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    t = {"model.transformer.wte.weight": w(V, D, std=1.0), "model.transformer.ln_f.weight": 1 + w(D),
         "model.transformer.ff_out.weight": w(V, D)}
    for i in range(SHAPE["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        t.update({p + "attn_norm.weight": 1 + w(D), p + "ff_norm.weight": 1 + w(D),
                  p + "q_proj.weight": w(D, D), p + "k_proj.weight": w(D, D), p + "v_proj.weight": w(D, D),
                  p + "attn_out.weight": w(D, D), p + "ff_proj.weight": w(F, D), p + "up_proj.weight": w(F, D),
                  p + "ff_out.weight": w(D, F)})
    return t


def write_llada_dir(directory: Path, *, seed: int = 0, config: dict | None = None, **tokenizer_kw) -> Path:
    """config.json, two bf16 shards with an index, tokenizer.json and tokenizer_config.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = llada_tensors(seed)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(directory / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in tensors.values())},
             "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama", **SHAPE,
           "n_kv_heads": SHAPE["n_heads"], "mlp_ratio": 2, "include_bias": False, "include_qkv_bias": False,
           "weight_tying": False, "layer_norm_type": "rms", "activation_type": "silu", "rope": True,
           "alibi": False, "scale_logits": False, "mask_token_id": MASK, "eos_token_id": EOS, "pad_token_id": EOS,
           "torch_dtype": "bfloat16"}
    cfg.update(config or {})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(directory, **tokenizer_kw)
    return directory
