"""The Llama / Qwen2 / Qwen3 Hugging Face layouts, and Dream's and the A2D models' built on them:
config.json <-> ``ModelConfig``, and which layout an export is written in.

    llama, qwen2, qwen3        ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``:
                               autoregressive models (``attention: causal``) unless the user names
                               another kind (a diffusion model published as a plain Qwen3 directory)
    Dream                      Dream's diffusion models: Qwen2's keys and tensors, full attention, the
                               mask token in ``mask_token_id``, logits shifted (hidden state i
                               predicts token i + 1; position 0 keeps its own)
    a2d-llama, -qwen2, -qwen3  the dllm library's A2D models: the source family's keys and tensors,
                               bidirectional; their config does not say masked or block diffusion (nor
                               the block size), so the kind is named by the user or by our own keys

The kind is never guessed: what a config says wins, a ``kind`` that contradicts it is refused, and
an A2D directory without one is refused until the user names it (``parse_kind``). Our exports add
``attention`` / ``block_size`` / ``shift_logits`` where the model type does not say them, and our
own settings under ``dlm_ray`` as in LLaDA's layout. Tensor names are in ``hf_tensors``.

Keys we cannot run are refused by name: an activation other than SiLU, MLP biases, sliding-window
layers in use, rope scaling other than Llama 3's (``llama3``), partial
rotary embeddings, mixture-of-experts blocks, multimodal rotary positions.
"""

from __future__ import annotations

from typing import Any

import torch

from dlm_ray.config.schema import DiffusionConfig, ModelConfig
from dlm_ray.core.kinds import KINDS, Autoregressive, kind_of
from dlm_ray.io.llada_layout import OURS, LayoutError

# model_type -> the family whose keys and tensor names it uses.
FAMILY = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "Dream": "qwen2",
          "a2d-llama": "llama", "a2d-qwen2": "qwen2", "a2d-qwen3": "qwen3"}
MODEL_TYPES = tuple(FAMILY)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "Dream": "DreamModel", "a2d-llama": "A2DLlamaLMHeadModel", "a2d-qwen2": "A2DQwen2LMHeadModel",
                 "a2d-qwen3": "A2DQwen3LMHeadModel"}
KIND_KEYS = ("attention", "block_size", "shift_logits")  # ours, where the model type does not say them
# The kind a model type says by itself (None: it cannot say it; a plain family's default is causal).
STATED = {"Dream": {"attention": "full", "shift_logits": True}}
PLAIN = ("llama", "qwen2", "qwen3")
# transformers' defaults for keys a config.json may leave out.
DEFAULT_MAX_LEN = {"llama": 2048, "qwen2": 32768, "qwen3": 32768}
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def is_hf_config(raw: dict[str, Any]) -> bool:
    return raw.get("model_type") in FAMILY


def family_of(model_type: str) -> str:
    return FAMILY[model_type]


def o_bias(raw: dict[str, Any]) -> bool:
    """Whether the layout holds an attention-output bias (Llama's and Qwen3's ``attention_bias``
    biases o_proj too; Qwen2's never): our block has none, so the loader requires it to be zero."""
    return FAMILY[raw["model_type"]] != "qwen2" and bool(raw.get("attention_bias", False))


# ------------------------------------------------------------------------------------------ kinds


def parse_kind(kind: str | dict[str, Any]) -> dict[str, Any]:
    """A kind named by the user: ``"causal"``, ``"full"`` or ``"block_causal:<block size>"``,
    ``+shift`` appended for a model whose logits are shifted (``"full+shift"``); or such a dict."""
    if isinstance(kind, dict):
        spec = {k: v for k, v in kind.items() if k in KIND_KEYS}
        if set(kind) - set(KIND_KEYS):
            raise LayoutError(f"kind {kind}: only {', '.join(KIND_KEYS)} may be named")
    else:
        text, shift = (kind[:-len("+shift")], True) if kind.endswith("+shift") else (kind, False)
        attention, _, size = text.partition(":")
        spec = {"attention": attention, "shift_logits": shift}
        if size:
            if not size.isdigit() or int(size) == 0:
                raise LayoutError(f"kind {kind!r}: the block size after ':' must be a positive integer")
            spec["block_size"] = int(size)
    if spec.get("attention") not in KINDS:
        raise LayoutError(f"kind {kind!r}: attention = {spec.get('attention')!r} is a model kind this version does "
                          f"not know ({', '.join(KINDS)})")
    return spec


def check_kind(model: ModelConfig, kind: str | dict[str, Any], where: str) -> None:
    """A kind named for a checkpoint whose config says its own (LLaDA's layout): only that kind."""
    named = parse_kind(kind)
    if named["attention"] != model.attention or named.get("shift_logits", False) != model.shift_logits or (
            kind_of(model).block_size is not None and named.get("block_size", model.block_size) != model.block_size):
        said = {"attention": model.attention, "block_size": model.block_size, "shift_logits": model.shift_logits}
        raise LayoutError(f"{where}: the checkpoint says {_say(said)}; kind {kind!r} contradicts it")


def _resolve_kind(raw: dict[str, Any], kind: str | dict[str, Any] | None, where: str,
                  default_kind: str | dict[str, Any] | None = None) -> dict[str, Any]:
    model_type = raw["model_type"]
    stated = STATED.get(model_type)
    if "attention" in raw:  # our own export says it
        stated = {k: raw[k] for k in KIND_KEYS if k in raw}
        if raw["attention"] not in KINDS:
            raise LayoutError(f"{where}: attention = {raw['attention']!r} is a model kind this version does not "
                              f"know ({', '.join(KINDS)})")
    named = parse_kind(kind) if kind is not None else None
    if stated is not None and named is not None:
        clash = [k for k in ("attention", "block_size") if k in named and k in stated and named[k] != stated[k]]
        if clash or (named.get("shift_logits") and not stated.get("shift_logits", False)):
            raise LayoutError(f"{where}: the checkpoint says {_say(stated)}; kind {kind!r} contradicts it")
    spec = stated or named
    if spec is None and model_type in PLAIN:
        spec = {"attention": "causal"}
    if spec is None and default_kind is not None:
        spec = parse_kind(default_kind)
    if spec is None:
        raise LayoutError(f"{where}: a {model_type} config does not say whether the model is masked diffusion or "
                          "block diffusion: name its kind (kind='full', or kind='block_causal:<block size>'; "
                          "'+shift' for shifted logits)")
    if spec["attention"] == "block_causal" and "block_size" not in spec:
        raise LayoutError(f"{where}: a block-causal model needs its block size: kind='block_causal:<block size>'")
    return {"shift_logits": False, **spec}


def _say(spec: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {spec[k]!r}" for k in KIND_KEYS if k in spec)


# ----------------------------------------------------------------------------------- config in


def _refuse_unsupported(raw: dict[str, Any], where: str) -> None:
    def refuse(key: str, why: str) -> None:
        raise LayoutError(f"{where}: {key} = {raw[key]!r} is not supported ({why})")

    act = raw.get("hidden_act", "silu")
    if act != "silu":
        refuse("hidden_act", "only 'silu'")
    if raw.get("mlp_bias"):
        refuse("mlp_bias", "the MLP has no biases")
    if raw.get("use_sliding_window"):
        refuse("use_sliding_window", "sliding-window attention")
    if any(t != "full_attention" for t in raw.get("layer_types") or ()):
        refuse("layer_types", "layers other than 'full_attention': sliding-window attention")
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key) or {}
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) not in ("default", "llama3"):
            refuse(key, "only plain rotary positions and Llama 3's scaling ('llama3')")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            refuse(key, "partial rotary embeddings")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "partial rotary embeddings")
    for key in MOE_KEYS:
        if raw.get(key):
            refuse(key, "mixture-of-experts blocks")
    if raw.get("use_mrope"):
        refuse("use_mrope", "multimodal rotary positions")


def model_config(raw: dict[str, Any], where: str, *, kind: str | dict[str, Any] | None = None,
                 default_kind: str | dict[str, Any] | None = None) -> ModelConfig:
    """The ``ModelConfig`` of a Llama/Qwen2/Qwen3/Dream/A2D config.json; what we cannot run is refused
    by name, and so is a ``kind`` the config contradicts or a kind that neither says
    (``default_kind``: a fallback where nothing says it, never a contradiction)."""
    model_type = raw.get("model_type")
    if model_type not in FAMILY:
        raise LayoutError(f"{where}: model_type is {model_type!r}, not one of {', '.join(MODEL_TYPES)}")
    _refuse_unsupported(raw, where)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in raw]
    if missing:
        raise LayoutError(f"{where}: missing {', '.join(missing)}")
    family = FAMILY[model_type]
    d, heads = raw["hidden_size"], raw["num_attention_heads"]
    kv = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or (128 if family == "qwen3" else d // heads)
    ours = raw.get(OURS, {}).get("model", {})
    # Qwen2's q/k/v biases are always there; our export of a model without them writes zeros.
    qkv_bias = ours.get("qkv_bias", True) if family == "qwen2" else bool(raw.get("attention_bias", False))
    rope = raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta") or rope.get("rope_theta") or 10000.0
    scaling = _llama3_scaling(raw)
    try:
        return ModelConfig(
            vocab_size=raw["vocab_size"], d_model=d, n_layers=raw["num_hidden_layers"], n_heads=heads,
            n_kv_heads=None if kv == heads else kv, head_dim=None if head_dim * heads == d else head_dim,
            d_mlp=raw["intermediate_size"], max_seq_len=raw.get("max_position_embeddings") or DEFAULT_MAX_LEN[family],
            rope_theta=float(theta), rope_scaling=scaling, norm_eps=raw.get("rms_norm_eps") or 1e-6, qkv_bias=qkv_bias,
            qk_norm=family == "qwen3", tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            init_std=raw.get("initializer_range") or 0.02, **_resolve_kind(raw, kind, where, default_kind))
    except ValueError as exc:
        raise LayoutError(f"{where}: {exc}") from None


def _llama3_scaling(raw: dict[str, Any]) -> dict[str, Any] | None:
    """Llama 3's rotary scaling from ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5)."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key) or {}
        if rope.get("rope_type", rope.get("type")) == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            return {"rope_type": "llama3", **{k: rope[k] for k in keys}}  # rope_theta is read on its own
    return None


def settings(raw: dict[str, Any], where: str, *, imported: str, kind: str | dict[str, Any] | None = None,
             default_kind: str | dict[str, Any] | None = None) -> dict[str, Any]:
    """``checkpoint.read_inference_config``'s settings of a config.json in one of these layouts."""
    ours = raw.get(OURS, {})
    return {"model": model_config(raw, where, kind=kind, default_kind=default_kind).to_dict(),
            "diffusion": ours.get("diffusion", DiffusionConfig().to_dict()),
            "tokenizer": {**ours.get("tokenizer", {"kind": "hf", "path": "tokenizer.json"}), "ids": token_ids(raw)},
            "source": ours.get("source", {"imported": imported}), "layout": raw["model_type"]}


def token_ids(raw: dict[str, Any]) -> dict[str, int]:
    """The token ids config.json names (EOS: the first of a list); pad falls back to EOS when neither
    config.json nor the tokenizer names one (an autoregressive model pads with EOS, as LLaDA does).
    A missing mask id is the tokenizer's to find or add."""
    ids: dict[str, int] = {}
    eos = raw.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    for key, value in (("mask_id", raw.get("mask_token_id")), ("eos_id", eos), ("pad_id", raw.get("pad_token_id"))):
        if isinstance(value, int):
            ids[key] = value
    return ids


# ---------------------------------------------------------------------------------- config out


def export_type(model: ModelConfig) -> str | None:
    """The model_type a model of this shape is exported as (None: LLaDA's layout holds it): an
    autoregressive model in its family's layout (Qwen3's with q/k norms, Qwen2's with biases,
    else Llama's); a shifted full-attention diffusion model in Dream's unless it has q/k norms or a
    head width of its own (Dream's code derives it); any other diffusion model in A2D's."""
    from dlm_ray.io.llada_layout import inexpressible

    family = "qwen3" if model.qk_norm else "qwen2" if model.qkv_bias else "llama"
    kind = kind_of(model)
    if isinstance(kind, Autoregressive):
        return family
    if inexpressible(model) is None:
        return None
    if model.noise != "mask":
        raise LayoutError(f"an embedding-diffusion model is exported in LLaDA's layout only, which cannot hold "
                          f"{inexpressible(model)}")
    own_width = model.head_size * model.n_heads != model.d_model
    if kind.can_infill and model.shift_logits and not model.qk_norm and not own_width:  # bidirectional
        return "Dream"
    return f"a2d-{family}"


def hf_config(model: ModelConfig, model_type: str, *, ids: dict[str, int], dtype: torch.dtype,
              ours: dict[str, Any]) -> dict[str, Any]:
    """config.json of ``model`` in ``model_type``'s layout, ours under ``dlm_ray``."""
    family = FAMILY[model_type]
    causal = isinstance(kind_of(model), Autoregressive)
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "hidden_size": model.d_model, "intermediate_size": model.d_mlp, "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads, "num_key_value_heads": model.kv_heads, "head_dim": model.head_size,
        "hidden_act": "silu", "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": model.rope_scaling.to_dict() if model.rope_scaling else None, "tie_word_embeddings": model.tie_embeddings,
        "vocab_size": model.vocab_size, "attention_dropout": 0.0, "initializer_range": model.init_std,
        "use_cache": causal, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "Dream":
        del cfg["head_dim"]  # Dream's code derives it from hidden_size / num_attention_heads
    if family == "llama":
        cfg.update({"attention_bias": model.qkv_bias, "mlp_bias": False, "pretraining_tp": 1})
    else:
        cfg.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": model.n_layers})
    if family == "qwen3":
        cfg["attention_bias"] = model.qkv_bias  # o_proj's bias is written as zeros
    if model_type.startswith("a2d-"):
        cfg.update({"attention": model.attention, "block_size": model.block_size, "shift_logits": model.shift_logits})
    cfg.update({"eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"], "mask_token_id": ids["mask_id"]})
    cfg[OURS] = ours
    return cfg
