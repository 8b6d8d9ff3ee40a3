"""Tensor names of the Llama / Qwen2 / Qwen3 layouts (Dream's and A2D's are their families'), and
reading and writing a ``Denoiser``'s weights under them.

    Denoiser                        Hugging Face
    wte.weight                      model.embed_tokens.weight
    blocks.{i}.attn_norm.weight     model.layers.{i}.input_layernorm.weight
    blocks.{i}.attn.q_proj.*        model.layers.{i}.self_attn.q_proj.*       (k_proj, v_proj alike)
    blocks.{i}.attn.attn_out.*      model.layers.{i}.self_attn.o_proj.*
    blocks.{i}.attn.q_norm.weight   model.layers.{i}.self_attn.q_norm.weight  (k_norm alike; Qwen3)
    blocks.{i}.ff_norm.weight       model.layers.{i}.post_attention_layernorm.weight
    blocks.{i}.mlp.ff_proj.weight   model.layers.{i}.mlp.gate_proj.weight
    blocks.{i}.mlp.up_proj.weight   model.layers.{i}.mlp.up_proj.weight
    blocks.{i}.mlp.ff_out.weight    model.layers.{i}.mlp.down_proj.weight
    ln_f.weight                     model.norm.weight
    lm_head.weight                  lm_head.weight                            (absent when tied)

Both use the same rotary convention (the two halves of a head rotated together), so the weights
go across as they are. A layout may hold tensors our block does not have, always zero in what we
write: Llama's and Qwen3's ``attention_bias`` biases o_proj too, and Qwen2's (Dream's) q/k/v
biases are always there. We write such tensors as zeros; reading, they are read aside and must
be zero, so nothing a model computes is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from dlm_ray.config.schema import ModelConfig
from dlm_ray.io import llada_layout as layout
from dlm_ray.io.hf_layout import FAMILY, o_bias
from dlm_ray.io.llada_layout import LayoutError

TOP = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
       "lm_head.weight": "lm_head.weight"}
IN_BLOCK = {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
            "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
            "attn.attn_out": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
            "mlp.ff_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.ff_out": "mlp.down_proj"}
FROM_BLOCK = {v: k for k, v in IN_BLOCK.items()}
TOP_FROM = {v: k for k, v in TOP.items()}
_OURS = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
_THEIRS = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def to_hf_name(name: str) -> str:
    """``Denoiser`` parameter name -> Hugging Face tensor name."""
    if name in TOP:
        return TOP[name]
    m = _OURS.fullmatch(name)
    if m is None or m.group(2) not in IN_BLOCK:
        raise LayoutError(f"parameter {name} has no Hugging Face name")
    return f"model.layers.{m.group(1)}.{IN_BLOCK[m.group(2)]}.{m.group(3)}"


def from_hf_name(name: str) -> str:
    """Hugging Face tensor name -> ``Denoiser`` name (an unknown name comes back as it is, and the
    loader refuses it as no part of the model)."""
    if name in TOP_FROM:
        return TOP_FROM[name]
    m = _THEIRS.fullmatch(name)
    if m is None or m.group(2) not in FROM_BLOCK:
        return name
    return f"blocks.{m.group(1)}.{FROM_BLOCK[m.group(2)]}.{m.group(3)}"


def _zero_names(cfg: ModelConfig, *, output_bias: bool, qkv_bias: bool) -> dict[str, list[int]]:
    """(Denoiser-style name -> shape) of the tensors a layout holds that ``cfg``'s model has not."""
    q, kv = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    out: dict[str, list[int]] = {}
    for i in range(cfg.n_layers):
        if output_bias:
            out[f"blocks.{i}.attn.attn_out.bias"] = [cfg.d_model]
        if qkv_bias and not cfg.qkv_bias:
            out.update({f"blocks.{i}.attn.q_proj.bias": [q], f"blocks.{i}.attn.k_proj.bias": [kv],
                        f"blocks.{i}.attn.v_proj.bias": [kv]})
    return out


def export_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, model_type: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(Hugging Face name, tensor)`` of a ``Denoiser`` state dict in ``model_type``'s layout: a tied
    head left out (the layout ties it), the zeros the layout holds added after their layer's tensors."""
    family = FAMILY[model_type]
    zeros = _zero_names(cfg, output_bias=family != "qwen2" and cfg.qkv_bias, qkv_bias=family == "qwen2")
    pending = dict(zeros)
    for name, t in state.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        yield to_hf_name(name), t
        layer = re.match(r"blocks\.(\d+)\.", name)
        for extra in [z for z in pending if layer and z.startswith(layer.group(0))]:
            yield to_hf_name(extra), torch.zeros(pending.pop(extra), dtype=t.dtype)
    for extra, shape in pending.items():  # a state dict without a layer's tensors: still complete
        yield to_hf_name(extra), torch.zeros(shape)


def load(model: nn.Module, files: list[Path], raw: dict[str, Any], *, pieces: layout.Pieces = layout.whole_parameter,
         grow: frozenset[str] = frozenset()) -> None:
    """Read a Hugging Face layout's weights into ``model`` (``layout.load_weights``: tensor by tensor,
    ``pieces`` of each, ``grow``n rows), the layout's tensors our block lacks read aside and checked
    to be zero. Rotary frequency buffers (older Llama checkpoints) and a tied head's copy are skipped."""
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    zeros = _zero_names(cfg, output_bias=o_bias(raw), qkv_bias=FAMILY[raw["model_type"]] == "qwen2")
    extra = {name: torch.empty(shape) for name, shape in zeros.items()}

    def rename(hf_name: str) -> str | None:
        if hf_name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and hf_name == "lm_head.weight"):
            return None
        return from_hf_name(hf_name)

    layout.load_weights(model, files, rename, pieces=pieces, extra=extra, grow=grow)
    for name, t in extra.items():
        if t.any():
            raise LayoutError(f"{files[0].parent}: {to_hf_name(name)} is not zero: our attention block has no "
                              f"{'output' if 'attn_out' in name else 'q/k/v'} biases to hold it")
