"""LLaDA's Hugging Face layout: the format of LLaDA-expressible diffusion models, and the safetensors
reader and writer every layout uses.

    config.json                       model_type "llada", LLaDA's architecture keys and token ids;
                                      our own settings (diffusion schedule, tokenizer, provenance)
                                      under "dlm_ray"
    model.safetensors                 one file, or shards model-0000i-of-0000n.safetensors listed in
                                      model.safetensors.index.json
    tokenizer.json, tokenizer_config.json   for HF tokenizers (special tokens, chat template)

Tensor names are LLaDA's (``model.transformer.blocks.{i}.q_proj.weight``, the LM head is
``model.transformer.ff_out.weight``); ``to_llada_name`` / ``from_llada_name`` map them to the
``Denoiser``'s. Safetensors (an 8-byte header length, a JSON header of name → dtype, shape and byte
range, then the raw bytes) is read here without memory-mapping: every tensor is read straight into
the parameter it belongs to, already allocated in the target dtype on the target device, so host
memory never holds a second full copy of the weights (an 8B model in fp32 would not fit).

What LLaDA's keys cannot say (grouped-query attention, biases, q/k norms, tied embeddings, a head
width of its own, the shifted head of adapted models, an autoregressive model) is written in the
Llama/Qwen/Dream layouts instead (``hf_layout``); ``llada_config`` refuses it by name.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dlm_ray.config.schema import DiffusionConfig, ModelConfig
from dlm_ray.core.kinds import MODEL_TYPES as KIND_MODEL_TYPES
from dlm_ray.core.kinds import KINDS, Autoregressive, kind_of

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
OURS = "dlm_ray"  # config.json key of our own settings
# config.json's model_type by model kind (kinds.py): LLaDA's own for a full-attention model; our
# own for the other kinds, in LLaDA's layout, so a tool built for LLaDA does not take them for one.
MODEL_TYPES = tuple(KIND_MODEL_TYPES)
DEFAULT_SHARD_BYTES = 4 << 30

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class LayoutError(ValueError):
    """A checkpoint directory that cannot be read as a model; the message names the file or field."""


# ------------------------------------------------------------------------------------------- names

_BLOCK = re.compile(r"blocks\.(\d+)\.(attn\.|mlp\.)?(\w+)\.weight")


def to_llada_name(name: str) -> str:
    """``Denoiser`` parameter name → LLaDA tensor name."""
    if name == "lm_head.weight":
        return "model.transformer.ff_out.weight"
    m = _BLOCK.fullmatch(name)
    if m:
        return f"model.transformer.blocks.{m.group(1)}.{m.group(3)}.weight"
    return f"model.transformer.{name}"


def from_llada_name(name: str) -> str:
    """LLaDA tensor name → ``Denoiser`` parameter name (the inverse of ``to_llada_name``)."""
    inner = name.removeprefix("model.transformer.")
    if inner == "ff_out.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.weight", inner)
    if m:
        group = {"q_proj": "attn.", "k_proj": "attn.", "v_proj": "attn.", "attn_out": "attn.",
                 "ff_proj": "mlp.", "up_proj": "mlp.", "ff_out": "mlp."}.get(m.group(2), "")
        return f"blocks.{m.group(1)}.{group}{m.group(2)}.weight"
    return inner


# ------------------------------------------------------------------------------------------ config

# LLaDA settings our denoiser implements only with these values: anything else is refused by name.
REQUIRED = {"block_type": "llama", "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
            "layer_norm_type": "rms", "activation_type": "silu", "scale_logits": False, "alibi": False,
            "rope": True, "attention_layer_norm": False, "input_emb_norm": False, "multi_query_attention": None,
            "clip_qkv": None}


def inexpressible(model: ModelConfig) -> str | None:
    """Why LLaDA's layout cannot hold a model of this shape (None: it can): an autoregressive model,
    or what the Llama/Qwen families add to LLaDA's block."""
    reasons = {"attention = 'causal' (an autoregressive model)": isinstance(kind_of(model), Autoregressive),
               f"n_kv_heads = {model.n_kv_heads} (grouped-query attention)": model.kv_heads != model.n_heads,
               f"head_dim = {model.head_dim} (not d_model / n_heads)": model.head_size * model.n_heads != model.d_model,
               "qkv_bias": model.qkv_bias, "qk_norm": model.qk_norm, "tie_embeddings": model.tie_embeddings,
               "shift_logits": model.shift_logits, "rope_scaling": model.rope_scaling is not None}
    found = [what for what, present in reasons.items() if present]
    return ", ".join(found) or None


def llada_config(model: ModelConfig, *, mask_id: int, eos_id: int, pad_id: int, dtype: torch.dtype,
                 ours: dict[str, Any]) -> dict[str, Any]:
    """config.json for a ``Denoiser`` of shape ``model``: LLaDA's keys, ours under ``dlm_ray``."""
    why = inexpressible(model)
    if why:
        raise LayoutError(f"LLaDA's layout cannot hold {why}: write it in a Llama/Qwen/Dream layout (hf_layout)")
    model_type = kind_of(model).model_type
    if model_type != "llada":  # same keys and tensor names; the kind says what it is
        block = {"model_type": model_type, "attention": model.attention, "block_size": model.block_size}
        if model.noise != "mask":  # embedding diffusion: its noise and the levels it was trained at
            block.update(noise=model.noise, time_shift=model.time_shift)
    else:
        block = {"model_type": "llada", "architectures": ["LLaDAModelLM"]}
    return {
        **block,
        "d_model": model.d_model, "n_heads": model.n_heads, "n_kv_heads": model.n_heads,
        "n_layers": model.n_layers, "mlp_hidden_size": model.d_mlp, "mlp_ratio": max(1, model.d_mlp // model.d_model),
        "vocab_size": model.vocab_size, "embedding_size": model.vocab_size,
        "max_sequence_length": model.max_seq_len, "rope_theta": model.rope_theta, "rms_norm_eps": model.norm_eps,
        **{k: v for k, v in REQUIRED.items() if v is not None},
        "mask_token_id": mask_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": False,
        OURS: ours,
    }


def model_config(cfg: dict[str, Any], where: str) -> ModelConfig:
    """The ``ModelConfig`` of a LLaDA config.json; a setting we cannot run is refused by name."""
    if cfg.get("model_type") not in MODEL_TYPES:
        raise LayoutError(f"{where}: model_type is {cfg.get('model_type')!r}, not 'llada'")
    attention = cfg.get("attention", "full")
    if attention not in KINDS:
        raise LayoutError(f"{where}: attention = {attention!r} is a model kind this version does not know "
                          f"({', '.join(KINDS)})")
    for key, want in REQUIRED.items():
        got = cfg.get(key, want)
        if got != want and not (key == "multi_query_attention" and got is False):
            raise LayoutError(f"{where}: {key} = {got!r} is not supported (only {want!r})")
    missing = [k for k in ("d_model", "n_heads", "n_layers", "vocab_size", "max_sequence_length") if k not in cfg]
    if missing:
        raise LayoutError(f"{where}: missing {', '.join(missing)}")
    if cfg.get("n_kv_heads") not in (None, cfg["n_heads"]):
        raise LayoutError(f"{where}: n_kv_heads = {cfg['n_kv_heads']} != n_heads = {cfg['n_heads']} "
                          "(grouped-query attention) is not supported")
    d_mlp = cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * cfg["d_model"]
    try:
        return ModelConfig(vocab_size=cfg.get("embedding_size") or cfg["vocab_size"], d_model=cfg["d_model"],
                           n_layers=cfg["n_layers"], n_heads=cfg["n_heads"], d_mlp=d_mlp,
                           max_seq_len=cfg["max_sequence_length"], rope_theta=cfg.get("rope_theta", 10000.0),
                           norm_eps=cfg.get("rms_norm_eps", 1e-5), attention=attention,
                           block_size=cfg.get("block_size", 16), noise=cfg.get("noise", "mask"),
                           time_shift=cfg.get("time_shift"))
    except ValueError as exc:
        raise LayoutError(f"{where}: {exc}") from None


def settings(raw: dict[str, Any], where: str, *, imported: str) -> dict[str, Any]:
    """``checkpoint.read_inference_config``'s settings of a LLaDA-layout config.json (``imported``:
    the source recorded for a directory without our key)."""
    ours = raw.get(OURS, {})
    ids = {"mask_id": raw.get("mask_token_id", 126336), "eos_id": raw.get("eos_token_id", 126081),
           "pad_id": raw.get("pad_token_id", raw.get("eos_token_id", 126081))}
    return {"model": model_config(raw, where).to_dict(),
            "diffusion": ours.get("diffusion", DiffusionConfig().to_dict()),
            "tokenizer": {**ours.get("tokenizer", {"kind": "hf", "path": "tokenizer.json"}), "ids": ids},
            "source": ours.get("source", {"imported": imported}), "layout": "llada"}


# ------------------------------------------------------------------------------------ safetensors


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header without ``__metadata__``, offset of the first data byte) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 1 << 30:
                raise LayoutError(f"{path}: not a safetensors file (header size {size})")
            header = json.loads(f.read(size))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LayoutError(f"{path}: unreadable safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or the single file."""
    index = directory / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise LayoutError(f"{directory}: shard {missing[0]} listed in {INDEX_FILE} is missing")
        return [directory / s for s in shards]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise LayoutError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


# A parameter's full shape and where its elements go: (first element of the flattened tensor, flat
# destination) pairs. By default the whole parameter; a process holding one partition of it (ZeRO-3)
# names only the elements it holds.
Pieces = Callable[[nn.Parameter], tuple[list[int], list[tuple[int, torch.Tensor]]]]


def whole_parameter(p: nn.Parameter) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
    return list(p.shape), [(0, p.data)]


def load_weights(model: nn.Module, files: list[Path], rename: Callable[[str], str | None] = from_llada_name, *,
                 pieces: Pieces = whole_parameter, extra: dict[str, torch.Tensor] | None = None,
                 grow: frozenset[str] = frozenset()) -> None:
    """Fill every parameter of ``model`` (allocated, any dtype and device) from ``files``, one tensor
    at a time, reading only the elements ``pieces`` names. Every parameter must be found exactly
    once, with its shape. ``rename`` maps a file's tensor name to the parameter's, or to None for a
    tensor the model does without (a buffer derived from the config, a tied head's copy).
    ``extra``: tensors the layout holds that are not parameters (read whole, for the caller to
    check), by their renamed names. ``grow``: parameters whose file tensor may have fewer rows (a
    vocabulary grown since): the file's rows fill the first rows, the rest are left to the caller."""
    params, extra = dict(model.named_parameters()), extra or {}
    seen: set[str] = set()
    for path in files:
        header, start = read_header(path)
        with open(path, "rb") as f:
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                ours = rename(name)
                if ours is None:
                    continue
                if ours not in params and ours not in extra:
                    raise LayoutError(f"{path}: tensor {name} is not part of the model")
                shape, parts = pieces(params[ours]) if ours in params else whole_parameter(extra[ours])
                if list(info["shape"]) != shape and not (ours in grow and _fewer_rows(info["shape"], shape)):
                    raise LayoutError(f"{path}: {name} has shape {info['shape']}, the config says {shape}")
                if info["dtype"] not in DTYPES:
                    raise LayoutError(f"{path}: {name} has unsupported dtype {info['dtype']}")
                dtype, (begin, end) = DTYPES[info["dtype"]], info["data_offsets"]
                numel = math.prod(info["shape"])
                if numel * dtype.itemsize != end - begin:
                    raise LayoutError(f"{path}: {name}'s byte range does not match its shape and dtype")
                for first, dest in parts:
                    count = max(0, min(dest.numel(), numel - first))
                    if count:  # a partition past the tensor's end (padding) reads nothing
                        f.seek(start + begin + first * dtype.itemsize)
                        _read_into(f, dest if count == dest.numel() else dest.view(-1)[:count], dtype,
                                   count * dtype.itemsize, path)
                seen.add(ours)
    missing = sorted((set(params) | set(extra)) - seen)
    if missing:
        name = to_llada_name(missing[0]) if rename is from_llada_name else missing[0]
        raise LayoutError(f"{files[0].parent}: no tensor for {name} ({len(missing)} missing)")


def _fewer_rows(file_shape: list[int], shape: list[int]) -> bool:
    return len(file_shape) == len(shape) and file_shape[1:] == shape[1:] and file_shape[0] <= shape[0]


def _read_into(f: Any, dest: torch.Tensor, dtype: torch.dtype, nbytes: int, path: Path) -> None:
    if dest.numel() * dtype.itemsize != nbytes:
        raise LayoutError(f"{path}: a tensor's byte range does not match its shape and dtype")
    if dest.device.type == "cpu" and dest.dtype == dtype and dest.is_contiguous():
        target = dest.view(torch.uint8).view(-1).numpy()  # the parameter's own memory
        if f.readinto(memoryview(target)) != nbytes:
            raise LayoutError(f"{path}: file ends inside a tensor (truncated?)")
        return
    buf = bytearray(nbytes)  # one tensor in the file's dtype, then converted / moved
    if f.readinto(buf) != nbytes:
        raise LayoutError(f"{path}: file ends inside a tensor (truncated?)")
    dest.copy_(torch.frombuffer(buf, dtype=dtype).view(dest.shape))


def save_weights(tensors: Iterator[tuple[str, torch.Tensor]], directory: Path, *, dtype: torch.dtype,
                 shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write ``(LLaDA name, tensor)`` pairs as safetensors in ``dtype``: one file, or shards of at most
    ``shard_bytes`` with an index, as Hugging Face writes them. Each shard is written as soon as it
    is full, so memory holds one shard's tensors at most (beyond what the caller holds)."""
    parts: list[tuple[Path, list[str], int]] = []  # (temporary file, names, bytes)
    shard: list[tuple[str, torch.Tensor]] = []
    size = 0

    def flush() -> None:
        tmp = directory / f".shard-{len(parts):05d}.tmp"
        _write_file(tmp, shard)
        parts.append((tmp, [n for n, _ in shard], size))
        shard.clear()

    for name, t in tensors:
        t = t.detach().to("cpu", dtype).contiguous()
        if shard and size + t.numel() * t.itemsize > shard_bytes:
            flush()
            size = 0
        shard.append((name, t))
        size += t.numel() * t.itemsize
    if shard or not parts:
        flush()
    n = len(parts)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for (tmp, _, _), fname in zip(parts, names):
        tmp.replace(directory / fname)
    if n > 1:
        index = {"metadata": {"total_size": sum(b for _, _, b in parts)},
                 "weight_map": {t: fname for (_, ts, _), fname in zip(parts, names) for t in ts}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return [directory / f for f in names]


def _write_file(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        nbytes = t.numel() * t.itemsize
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in tensors:
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).view(-1).numpy()))
