"""Tiny random Llama / Qwen2 / Qwen3 checkpoints written by transformers itself (nothing downloaded),
and their reference logits, for the layout tests.

Every weight is random, biases and norm gains included (they start at 0 and 1 and would hide a wrong
map). The tokenizer is ``llada_dir``'s byte-level one without a mask token, as an autoregressive
model's is: 256 bytes, then ``<|startoftext|>`` (256), ``<|endoftext|>`` (257, EOS), three more
specials: 261 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.llada_dir import write_tokenizer

EOS, NUM_TOKENS = 257, 261
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, eos_token_id=EOS)
# Each family with what sets it apart: Llama untied without biases at the tokenizer's exact size and a
# rope theta of its own; Qwen2 with q/k/v biases, tied, spare vocabulary rows; Qwen3 with q/k norms
# and a head width of its own (32, not 64 / 4).
SHAPES: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=NUM_TOKENS, tie_word_embeddings=False, rope_theta=500000.0),
    "qwen2": dict(vocab_size=272, tie_word_embeddings=True),
    "qwen3": dict(vocab_size=272, tie_word_embeddings=True, head_dim=32),
}


def hf_model(family: str, seed: int = 0, **update: Any) -> torch.nn.Module:
    """A random ``{Llama,Qwen2,Qwen3}ForCausalLM`` in float32, eval mode."""
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config}[family]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "qwen3": transformers.Qwen3ForCausalLM}[family]
    config = config_cls(**{**COMMON, **SHAPES[family], **update})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0 if name.endswith(".bias") else 1))
    return model


def save_hf(model: torch.nn.Module, directory: Path, *, max_shard_size: str | None = None,
            config: dict[str, Any] | None = None, mask: bool = False) -> Path:
    """``save_pretrained`` (safetensors; sharded with ``max_shard_size``) and the tokenizer files;
    ``config``: keys to change in config.json; ``mask``: a tokenizer with a mask token (261)."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), safe_serialization=True, **kwargs)
    write_tokenizer(directory, chat_template=None, mask=mask)
    if config:
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}, indent=2))
    return directory


def positions(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, as ours count them (a left-padded row starts at 0)."""
    return (attention_mask_BL.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def reference_logits(model: torch.nn.Module, ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor, *,
                     bidirectional: bool = False) -> torch.Tensor:
    """transformers' own forward: causal with the padding mask, or (``bidirectional``) with a 4-D
    mask letting every position see every real token."""
    mask = attention_mask_BL
    if bidirectional:
        B, L = ids_BL.shape
        mask = attention_mask_BL.bool()[:, None, None, :].expand(B, 1, L, L)
    return model(ids_BL, attention_mask=mask, position_ids=positions(attention_mask_BL)).logits.float()


def batch(seed: int = 0, *, padded: bool, L: int = 12, B: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids below the tokenizer's size and an attention mask (rows 1 and 2 left-padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, NUM_TOKENS, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    if padded:
        am[1, :3] = 0
        am[2, :L - 2] = 0
        ids = ids.masked_fill(am == 0, EOS)
    return ids, am
