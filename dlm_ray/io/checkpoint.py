"""The one owner of the checkpoint formats.

A run lives in ``<storage_path>/<run_name>/`` (``run_dir``), a local path or an ``s3://`` / ``gs://``
URI; Ray Train's ``checkpoint_*`` folders sit there, and ``latest_checkpoint`` finds the newest.

Training checkpoint (one Ray Train checkpoint directory, every rank writing its own files into it):

    ds/                    DeepSpeed ``save_checkpoint`` output: ``latest`` + ``<tag>/`` with the
                           model and ZeRO optimizer shards of every rank (ZeRO-3 included)
    trainer_state.json     step, tokens seen, data position ([epoch, item, row]: the first row not trained on)
    rng_rank<r>.pt         each rank's torch / numpy / python RNG states
    run_config.json        the full PretrainConfig, so a checkpoint explains itself

Inference checkpoint (``export``): the Hugging Face layout of the model's family, config.json with
ours (diffusion schedule, tokenizer, where it came from) under ``dlm_ray``, safetensors and the
tokenizer files: LLaDA's (``llada_layout``) where it can hold the model; Llama's, Qwen2's or Qwen3's
for an autoregressive model (transformers loads it as it is); Dream's or A2D's for another
diffusion model (``hf_layout``, ``hf_tensors``). Published directories of these layouts are the
same without our key, so batch generation, Serve and evaluation load any, local or at a URI (copied
once per node into the node's checkpoint cache, ``storage.node_copy``; the settings alone without
the weights). Where a config cannot say the model's kind (an A2D model, a diffusion model in a
plain Qwen3 directory) the caller names it (``kind``). Earlier exports (config.json with a
``model`` key, our own tensor names) still load.

An export is written whole into a staging directory and swapped in (``storage.staged_dir``), so a
directory never mixes two exports; it refuses to replace a directory that is not a model's.
config.json records ``content_sha256``, a hash of the weights (names, dtypes, shapes, bytes) and the
tokenizer files computed while they are written, so ``checkpoint_hash`` reads config.json alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from dlm_ray.io import hf_layout, hf_tensors
from dlm_ray.io import llada_layout as layout
from dlm_ray.config.schema import DiffusionConfig, ModelConfig, PretrainConfig
from dlm_ray.core.kinds import kind_of
from dlm_ray.core.model import Denoiser
from dlm_ray.io.storage import StorageError, filesystem_for, list_tree, node_copy, read_bytes, staged_dir
from dlm_ray.core.tokenizer import TOKENIZER_CONFIG, ByteTokenizer, HFTokenizer, load_tokenizer

DS_DIR = "ds"
STATE_FILE = "trainer_state.json"
RUN_CONFIG_FILE = "run_config.json"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's list of committed checkpoints
CONFIG_FILE = layout.CONFIG_FILE
CONTENT_KEY = "content_sha256"  # under config.json's ``dlm_ray``: the hash of everything but config.json
Kind = str | dict[str, Any] | None  # a model kind named by the caller (hf_layout.parse_kind)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message says which file."""


# ------------------------------------------------------------------------------------------- runs


def run_dir(cfg: PretrainConfig) -> str:
    """The run's directory: ``<storage_path>/<run_name>``, local paths made absolute."""
    base = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    return f"{base.rstrip('/')}/{cfg.run_name}"


def latest_checkpoint(cfg: PretrainConfig) -> tuple[str, dict[str, Any]] | None:
    """(path, trainer state) of the newest complete checkpoint of the run, or None for a new run.

    Only what Ray Train committed counts (a folder whose upload did not finish is passed over).
    A run directory with checkpoint folders but no readable state is an error: resuming must never
    quietly become a fresh start over an existing run.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem_for(run_dir(cfg))
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    entries = fs.get_file_info(pafs.FileSelector(path))
    ckpts = sorted(e.path for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_"))
    committed = _committed(fs, path)
    if committed is not None:  # an upload that never finished is no checkpoint: its folder is passed over
        ckpts = [ck for ck in ckpts if ck.rsplit("/", 1)[-1] in committed]
    best: tuple[str, dict[str, Any]] | None = None
    for ck in ckpts:
        try:
            with fs.open_input_stream(f"{ck}/{STATE_FILE}") as f:
                state = json.loads(f.read())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {ck} is incomplete or corrupt ({exc}); remove it to resume "
                                  f"from an earlier one, or choose a new run_name") from exc
        if best is None or state["step"] > best[1]["step"]:
            best = (ck, state)
    return best


def _committed(fs: Any, path: str) -> set[str] | None:
    """The checkpoint folders Ray Train has committed (every rank's part uploaded), from its
    checkpoint manager's snapshot in the run directory; None where there is no snapshot."""
    import pyarrow.fs as pafs

    snapshot = f"{path}/{RAY_SNAPSHOT_FILE}"
    if fs.get_file_info(snapshot).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(snapshot) as f:
        state = json.loads(f.read())
    return {r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])}


def _is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def local_path(path: str | Path, *, weights: bool = True) -> Path:
    """``path`` itself if local, else this node's cached copy of the remote directory it names
    (``weights=False``: every file but the weights, enough for the settings and the tokenizer)."""
    if not _is_uri(path):
        return Path(path)
    try:
        return node_copy(str(path), weights=weights)
    except StorageError as exc:
        raise CheckpointError(str(exc)) from None


def _is_model_dir(names: list[str]) -> bool:
    """A directory an export may replace: a model's files, no subdirectories (a run's, say)."""
    return all("/" not in n for n in names) and any(n == CONFIG_FILE or n.endswith(".safetensors") for n in names)


@contextlib.contextmanager
def staged(out: str | Path) -> Iterator[Path]:
    """A fresh local directory to write an export into; on success it replaces ``out`` whole."""
    try:
        with staged_dir(out, replaceable=_is_model_dir) as d:
            yield d
    except StorageError as exc:
        raise CheckpointError(str(exc)) from None


# ---------------------------------------------------------------------------------- training state


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_training(directory: Path, engine: Any, *, rank: int, state: dict[str, Any], cfg: PretrainConfig) -> None:
    """Every rank calls this with the same ``directory`` layout (its own local staging dir)."""
    tag = f"step{state['step']}"
    engine.save_checkpoint(str(directory / DS_DIR), tag=tag)
    torch.save(rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(state))
        (directory / RUN_CONFIG_FILE).write_text(json.dumps(cfg.to_dict()))


def load_training(directory: Path, engine: Any, *, rank: int) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) and RNG; return the trainer state."""
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {STATE_FILE}: incomplete or not a dlm-ray checkpoint")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state_path} is corrupt: {exc}") from exc
    load_path, _ = engine.load_checkpoint(str(directory / DS_DIR), tag=f"step{state['step']}")
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint for step {state['step']} under {directory / DS_DIR}")
    rng_path = directory / f"rng_rank{rank}.pt"
    if rng_path.is_file():  # absent when resuming on more ranks than saved: fresh RNG is then correct
        set_rng_state(torch.load(rng_path, weights_only=False))
    return state


# ----------------------------------------------------------------------------------------- export


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a training checkpoint, whatever its ZeRO stage, in one process.

    DeepSpeed's reader narrates each file and draws a progress bar; that commentary is kept out of
    the console (a failure still raises with its message). It needs no accelerator, so on a machine
    without CUDA it is told the CPU rather than left to warn while guessing."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    directory = Path(checkpoint_dir)
    state = json.loads((directory / STATE_FILE).read_text())
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(directory / DS_DIR), tag=f"step{state['step']}")
    return {k.removeprefix("module."): v.contiguous() for k, v in sd.items()}


def export(checkpoint_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> str:
    """Turn a (possibly ZeRO-3 sharded) training checkpoint into an inference checkpoint in its
    family's layout, weights in ``dtype``. Either may be a local directory or a URI; returns where
    it went."""
    with staged(out_dir) as out:
        _export(local_path(checkpoint_dir), out, dtype)
    return str(out_dir)


def _export(src: Path, out: Path, dtype: torch.dtype) -> None:
    if not (src / RUN_CONFIG_FILE).is_file():
        raise CheckpointError(f"{src} has no {RUN_CONFIG_FILE}: not a dlm-ray training checkpoint")
    cfg = PretrainConfig.model_validate(json.loads((src / RUN_CONFIG_FILE).read_text()))
    state = json.loads((src / STATE_FILE).read_text())
    source = {"run_name": cfg.run_name, "step": state["step"], "tokens_seen": state.get("tokens_seen")}
    write_inference(consolidated_state_dict(src), cfg.model, load_tokenizer(cfg.tokenizer), out,
                    diffusion=cfg.diffusion, source=source, dtype=dtype)


def write_inference(state: dict[str, torch.Tensor], model_cfg: ModelConfig, tok: Any, out: Path, *,
                    diffusion: DiffusionConfig, source: dict[str, Any], dtype: torch.dtype = torch.float32,
                    shard_bytes: int = layout.DEFAULT_SHARD_BYTES) -> None:
    """Weights (``Denoiser`` names) + settings as an inference checkpoint in the layout of the
    model's family (``hf_layout.export_type``; LLaDA's where it can hold the model). config.json
    comes last and records the content hash of the files before it."""
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()

    def hashed(items: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        # Hash each tensor as it goes to the writer, as stored (dtype, contiguous): no second read.
        for name, t in items:
            t = t.detach().to("cpu", dtype).contiguous()
            digest.update(f"{name}|{layout.DTYPE_NAMES[dtype]}|{list(t.shape)}\n".encode())
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            yield name, t

    model_type = hf_layout.export_type(model_cfg)
    named = ((layout.to_llada_name(k), v) for k, v in state.items()) if model_type is None \
        else hf_tensors.export_tensors(state, model_cfg, model_type)
    layout.save_weights(hashed(named), out, dtype=dtype, shard_bytes=shard_bytes)
    tok_cfg = tok.to_config()
    if isinstance(tok, HFTokenizer):
        tok.save(out)
        tok_cfg = {"kind": "hf", "path": "tokenizer.json"}
        for name in ("tokenizer.json", TOKENIZER_CONFIG):
            if (out / name).is_file():
                digest.update(name.encode() + b"\n" + (out / name).read_bytes())
    ours = {"model": model_cfg.to_dict(), "diffusion": diffusion.to_dict(), "tokenizer": tok_cfg, "source": source,
            CONTENT_KEY: digest.hexdigest()}
    ids = {"mask_id": tok.mask_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    config = layout.llada_config(model_cfg, **ids, dtype=dtype, ours=ours) if model_type is None \
        else hf_layout.hf_config(model_cfg, model_type, ids=ids, dtype=dtype, ours=ours)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def save_inference(model: Denoiser, tokenizer_cfg: dict[str, Any], out_dir: str | Path,
                   diffusion: DiffusionConfig | None = None, *, dtype: torch.dtype = torch.float32,
                   shard_bytes: int = layout.DEFAULT_SHARD_BYTES) -> str | Path:
    """Write a model held in memory (e.g. an untrained one for tests) in the inference format."""
    with staged(out_dir) as out:
        write_inference(model.state_dict(), model.config, load_tokenizer(tokenizer_cfg), out,
                        diffusion=diffusion or DiffusionConfig(), source={"run_name": None, "step": 0},
                        dtype=dtype, shard_bytes=shard_bytes)
    return out_dir


def read_inference_config(directory: str | Path, *, kind: Kind = None,
                          default_kind: Kind = None) -> tuple[dict[str, Any], Any]:
    """(settings, tokenizer) of an inference checkpoint, without loading the weights. The settings
    have the same keys for every layout: ``model`` (the checkpoint's ModelConfig dict),
    ``diffusion``, ``tokenizer`` (a spec; ``ids``: those config.json names), ``source``, ``layout``
    ("llada", "legacy" or the Hugging Face model_type: "llama", "qwen2", "qwen3", "Dream",
    "a2d-qwen3", ...) and ``mask_token``: ``id``, ``added`` (the tokenizer had none: ``<|mask|>``
    added at the first free id, as to every autoregressive tokenizer) and ``vocab_size`` (the rows
    a model needs to embed it; ``init_from`` fills rows beyond the checkpoint's, and a masking
    run's mask row, with the mean of the existing tokens' rows).

    ``kind`` ("full", "block_causal:32", "causal"; "+shift" for shifted logits) names the kind
    where the config cannot (an A2D directory; a diffusion model in a plain Qwen3 directory);
    one the config contradicts is refused. ``default_kind``: a fallback only where nothing says
    it (the kind a run starting from the checkpoint trains). A diffusion model whose tokenizer
    has no mask token is refused."""
    d = local_path(directory, weights=False)
    raw = _raw_config(d)
    where = str(d / CONFIG_FILE)
    if "model" in raw and "model_type" not in raw:  # an export of an earlier version
        meta = {**raw, "layout": "legacy"}
    elif raw.get("model_type") in layout.MODEL_TYPES:
        meta = _checked(lambda: layout.settings(raw, where, imported=str(directory)))
    elif hf_layout.is_hf_config(raw):
        meta = _checked(lambda: hf_layout.settings(raw, where, imported=str(directory), kind=kind,
                                                   default_kind=default_kind))
    else:
        raise CheckpointError(f"{where}: neither a LLaDA config (model_type 'llada'), one of "
                              f"{', '.join(hf_layout.MODEL_TYPES)}, nor a dlm-ray export (model_type is "
                              f"{raw.get('model_type')!r})")
    model_cfg, tok = ModelConfig.model_validate(meta["model"]), _tokenizer(meta["tokenizer"], d)
    if kind is not None and meta["layout"] in ("legacy", "llada"):
        _checked(lambda: hf_layout.check_kind(model_cfg, kind, where))
    added = bool(getattr(tok, "mask_added", False))
    if added and kind_of(model_cfg).masked_training:
        raise CheckpointError(f"{d}: the tokenizer has no mask token (and config.json no mask_token_id): a diffusion "
                              "model needs the mask token it was trained with")
    meta["mask_token"] = {"id": tok.mask_id, "added": added, "vocab_size": max(model_cfg.vocab_size, tok.mask_id + 1)}
    return meta, tok


def _raw_config(d: Path) -> dict[str, Any]:
    if not (d / CONFIG_FILE).is_file():
        raise CheckpointError(f"{d} has no {CONFIG_FILE}: not a model directory (export a training checkpoint "
                              "with jobs/export.py, or point at a LLaDA, Llama, Qwen or Dream directory)")
    try:
        return json.loads((d / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{d / CONFIG_FILE} is not valid JSON: {exc}") from None


def _checked(build: Any) -> Any:
    try:
        return build()
    except layout.LayoutError as exc:  # a layout's refusal, as every loader's caller catches it
        raise CheckpointError(str(exc)) from None


def _tokenizer(spec: dict[str, Any], d: Path) -> Any:
    if spec.get("kind") == "byte":
        tok = ByteTokenizer()
        given = spec.get("ids")
        if given and given != {"mask_id": tok.mask_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}:
            raise CheckpointError(f"{d / CONFIG_FILE}: token ids {given} do not match the byte tokenizer's")
        return tok
    spec = {**spec, "path": str(d / spec["path"])}
    if not Path(spec["path"]).is_file():
        raise CheckpointError(f"{d} has no {Path(spec['path']).name}: the model's tokenizer is missing")
    try:
        return load_tokenizer(spec)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def read_weights(model: Denoiser, directory: Path, meta: dict[str, Any], *, pieces: layout.Pieces = layout.whole_parameter,
                 grow: frozenset[str] = frozenset()) -> None:
    """Fill ``model`` from a local checkpoint directory of ``meta``'s layout, tensor by tensor
    (``pieces`` and ``grow`` as ``llada_layout.load_weights`` takes them)."""
    def read() -> None:
        files = layout.weight_files(directory)
        if meta["layout"] not in ("legacy", "llada"):
            return hf_tensors.load(model, files, _raw_config(directory), pieces=pieces, grow=grow)
        rename = (lambda name: name) if meta["layout"] == "legacy" else layout.from_llada_name  # noqa: E731
        layout.load_weights(model, files, rename, pieces=pieces, grow=grow)

    _checked(read)


def load_inference(directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   compile: bool = False, kind: Kind = None) -> tuple[Denoiser, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, settings) from an inference checkpoint, local or at a URI.

    The weights go tensor by tensor into a model allocated once in ``dtype`` on ``device``; nothing
    is returned unless every tensor was found with the right shape. ``compile`` compiles its blocks.
    ``kind``: the model's kind where its config cannot say it (``read_inference_config``). An
    autoregressive model keeps its own vocabulary: a mask token added to its tokenizer is never
    fed to it."""
    d = local_path(directory)
    meta, tok = read_inference_config(d, kind=kind)
    model = Denoiser.empty(ModelConfig.model_validate(meta["model"]), device=device, dtype=dtype)
    read_weights(model, d, meta)
    if compile:
        from dlm_ray.core.model import compile_blocks

        compile_blocks(model)
    return model.eval(), tok, meta


def inference_placement(want_gpu: bool, dtype: str, cpu_threads: int) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for a serving process: bf16 on a GPU and fp32 on CPU unless ``dtype`` says
    otherwise. On CPU, torch gets ``cpu_threads`` threads: the CPUs its Ray actor was given."""
    on_gpu = want_gpu and torch.cuda.is_available()
    name = dtype if dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    if not on_gpu:
        torch.set_num_threads(max(1, cpu_threads))
    return torch.device("cuda" if on_gpu else "cpu"), getattr(torch, name)


def checkpoint_hash(directory: str | Path) -> str:
    """Identity of an inference checkpoint, local or at a URI, first 16 hex digits of a SHA-256.
    Outputs record it so every generated row names the weights behind it. Never reads the weights:
    an export's config.json records their hash, so it is the hash of config.json; for a directory
    without one (a published LLaDA, an earlier export) config.json, the index and every file's name
    and size stand for the content."""
    try:
        filesystem, root, files = list_tree(str(directory))
    except StorageError:
        files = []
    names = {f.path for f in files}
    if CONFIG_FILE not in names:
        raise CheckpointError(f"{directory} has no {CONFIG_FILE}: export a training checkpoint with jobs/export.py first")
    config = read_bytes(filesystem, f"{root}/{CONFIG_FILE}")
    h = hashlib.sha256(config)
    try:
        recorded = json.loads(config).get(layout.OURS, {}).get(CONTENT_KEY)
    except (json.JSONDecodeError, AttributeError):
        raise CheckpointError(f"{directory}/{CONFIG_FILE} is not a JSON object") from None
    if not recorded:
        if not names & {layout.SINGLE_FILE, layout.INDEX_FILE}:
            raise CheckpointError(f"{directory}: no {layout.SINGLE_FILE} or {layout.INDEX_FILE}")
        for f in files:
            h.update(f"{f.path}\0{f.size}\n".encode())
        if layout.INDEX_FILE in names:
            h.update(read_bytes(filesystem, f"{root}/{layout.INDEX_FILE}"))
    return h.hexdigest()[:16]
