"""The DeepSpeed engine's setup, without Ray: what the training workers and the GPU check share.

``deepspeed_config`` (ZeRO stage, offload, bf16 on GPU, clipping; a JSON file's settings override
it key by key, sections merged), ``make_optimizer`` (torch's fused AdamW on GPU),
``checkpointed_blocks`` (activation checkpointing), ``check_memory`` (DeepSpeed's estimate of the
model states per GPU, refusing what cannot fit), ``peak_flops`` (by GPU name, for MFU),
``build_model`` (the model built once, in the engine's dtype, partitioned at construction under
ZeRO-3, ``init_from``'s weights read tensor by tensor) and ``start_engine`` (all of it, then
``deepspeed.initialize``). With ``train.py`` the only modules that import DeepSpeed, and only
inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from dlm_ray.config.schema import ModelConfig, PretrainConfig, TrainConfig
from dlm_ray.core.model import Denoiser, compile_blocks, no_init

# Dense bf16 tensor-core peaks (FLOP/s) by a substring of the GPU's name; the first match wins.
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12))


def peak_flops(device_name: str, tc: TrainConfig) -> float | None:
    """One device's peak FLOP/s for MFU: ``train.peak_flops`` if set, else by the GPU's name; None on
    a CPU or a device not in the table (no MFU rather than a made-up one)."""
    if tc.peak_flops:
        return tc.peak_flops
    return next((f for key, f in PEAK_FLOPS if key in device_name), None)


def checkpointed_blocks(tc: TrainConfig, n_layers: int) -> frozenset[int]:
    """The blocks whose activations are recomputed in the backward pass."""
    if tc.activation_checkpointing == "full":
        return frozenset(range(n_layers))
    if tc.activation_checkpointing == "every_k":
        return frozenset(range(0, n_layers, tc.activation_checkpointing_k))
    return frozenset()


def check_memory(model_cfg: ModelConfig, tc: TrainConfig, device_bytes: int | None, *, on_gpu: bool = True) -> str:
    """DeepSpeed's estimate of the per-GPU memory of the model states (parameters, gradients,
    optimizer; activations come on top) for this model, ZeRO stage and worker count, as a line to
    print; a configuration that cannot fit in ``device_bytes`` is refused with the numbers. A CPU
    run (``on_gpu`` False) is described as one: host memory per CPU worker."""
    from dlm_ray.core.model import num_params
    from dlm_ray.train.plan import largest_layer, model_state_bytes

    n, workers = num_params(model_cfg), tc.num_workers
    need = model_state_bytes(n, largest_layer(model_cfg), zero_stage=tc.zero_stage, gpus=workers,
                             gpus_per_node=workers, offload_optimizer=tc.offload_optimizer,
                             offload_param=tc.offload_param)
    gib = 2**30
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    if not on_gpu:
        return (f"[memory] DeepSpeed ZeRO-{tc.zero_stage} estimate: {need / gib:.2f} GiB of host memory per worker "
                f"for the model states of {size} parameters on {workers} CPU workers (activations come on top)")
    line = (f"[memory] DeepSpeed ZeRO-{tc.zero_stage} estimate: {need / gib:.1f} GiB per GPU for the model states "
            f"of {size} parameters on {workers} GPUs (activations come on top)")
    if device_bytes is None:
        return line + "; no device memory to check against"
    if need > device_bytes:
        raise ValueError(f"this configuration cannot fit: ZeRO-{tc.zero_stage} needs {need / gib:.1f} GiB per GPU "
                         f"for the model states of {n / 1e9:.2f}B parameters on {workers} GPUs, and the device "
                         f"has {device_bytes / gib:.1f} GiB; raise zero_stage or num_workers, or offload")
    return line + f" of {device_bytes / gib:.1f} GiB"


def make_optimizer(params: Iterable[torch.nn.Parameter], tc: TrainConfig, *, use_gpu: bool) -> Any:
    """On GPU, torch's fused AdamW (one kernel for every parameter's update), handed to DeepSpeed;
    on CPU None: DeepSpeed builds its own from the config."""
    if not use_gpu:
        return None
    return torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay, fused=True)


def deepspeed_config(tc: TrainConfig, *, use_gpu: bool) -> dict[str, Any]:
    """The generated DeepSpeed config; keys of ``train.deepspeed_config`` (a JSON file) override it."""
    bf16 = use_gpu if tc.bf16 is None else tc.bf16
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if tc.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    cfg: dict[str, Any] = {
        "train_batch_size": tc.batch_size,
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # The learning rate is set each step by lr_at, so resumes follow the same schedule.
        "optimizer": {"type": "AdamW", "params": {"lr": tc.lr, "betas": list(tc.betas),
                                                  "weight_decay": tc.weight_decay}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if use_gpu:
        del cfg["optimizer"]  # make_optimizer's fused AdamW
    if tc.deepspeed_config:
        cfg = merge_settings(cfg, _read_override(tc.deepspeed_config))
    return cfg


def _read_override(path: str) -> dict[str, Any]:
    try:
        override = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"train.deepspeed_config: cannot read {path} as JSON ({exc})") from None
    if not isinstance(override, dict):
        raise ValueError(f"train.deepspeed_config: {path} holds a {type(override).__name__}, not a JSON object")
    return override


def merge_settings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s settings, sections merged key by key at every depth: overriding
    one key of ``zero_optimization`` keeps the section's others (its stage above all)."""
    out = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_settings(out[key], value) if both else value
    return out


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage DeepSpeed runs with this config (0 without a ``zero_optimization`` section)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def engine_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed holds the model's weights in (the optimizer keeps fp32 masters)."""
    if ds_config.get("bf16", ds_config.get("bfloat16", {})).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32


# ----------------------------------------------------------------------------------- the model


def build_model(cfg: PretrainConfig, *, ds_config: dict[str, Any], device: torch.device, resume: bool) -> Denoiser:
    """The model a worker hands to ``deepspeed.initialize``, built once.

    With ``init_from`` (unless resuming: a checkpoint restores its own weights) nothing is drawn at
    random: parameters are allocated once, in the dtype the engine holds them in, and the export's
    tensors are read into them one at a time. Under ZeRO-3 the model is built under
    ``deepspeed.zero.Init``, which keeps only this process's partition of each parameter (a
    parameter is whole only for a moment, as its layer is built), and each process reads only its
    partitions' bytes from the files: no process ever holds the whole model. Copying each parameter
    in from rank 0 inside ``GatheredParameters`` instead would make every parameter whole again on
    every process, have rank 0 read the whole export and send the weights to every rank; reading
    the slices costs none of that.

    Otherwise the initial weights are drawn as ``Denoiser(cfg.model)`` draws them: on the CPU in
    fp32 (ZeRO 0-2; DeepSpeed casts and moves the model), or under ZeRO-3 partitioned as each layer
    is built and then drawn one gathered parameter at a time.
    """
    load = bool(cfg.init_from) and not resume
    if zero_stage(ds_config) == 3:
        model = _build_partitioned(cfg, ds_config, draw=not load)
    elif load:
        model = Denoiser.empty(cfg.model, device=device, dtype=engine_dtype(ds_config))
    else:
        model = Denoiser(cfg.model)
    if load:
        _read_init_from(model, str(cfg.init_from), partitioned=zero_stage(ds_config) == 3)
    model.checkpointed = checkpointed_blocks(cfg.train, cfg.model.n_layers)
    if cfg.model.compile:
        compile_blocks(model)
    return model.train()


def _build_partitioned(cfg: PretrainConfig, ds_config: dict[str, Any], *, draw: bool) -> Denoiser:
    import deepspeed

    # zero.Init reads the number of processes from DeepSpeed's communication layer: join it to the
    # torch.distributed group the worker is in (Ray Train set that one up).
    deepspeed.init_distributed()
    # zero.Init partitions each layer's parameters as soon as the layer is built, so the model's own
    # reset_parameters (run at the end of construction) sees only empty partitions: the weights are
    # drawn afterwards, each parameter gathered in turn, in the same order and with the same values.
    with deepspeed.zero.Init(config_dict_or_path=ds_config), contextlib.nullcontext() if draw else no_init():
        model = Denoiser(cfg.model)
    if draw:
        rank = deepspeed.comm.get_rank()
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    model.reset_parameters([(name, p)])
    return model


def _read_init_from(model: Denoiser, init_from: str, *, partitioned: bool) -> None:
    """``init_from``'s weights into ``model``, each process its own partitions under ZeRO-3. A model
    with a larger vocabulary than the checkpoint's (a mask token added to an autoregressive
    tokenizer) gets the checkpoint's rows first and the mean of its tokens' rows in the new ones;
    so does a diffusion model's mask row where the added token fell in a spare row."""
    from dlm_ray.core.kinds import kind_of_model
    from dlm_ray.io.checkpoint import CheckpointError, local_path, read_inference_config, read_weights
    from dlm_ray.io.llada_layout import whole_parameter

    directory, cfg = local_path(init_from), model.config
    # The run names the kind it trains; it stands in only where the checkpoint cannot say its own.
    meta, _ = read_inference_config(directory, default_kind={"attention": cfg.attention, "block_size": cfg.block_size})
    theirs, mask = meta["model"]["vocab_size"], meta["mask_token"]
    grow = frozenset({"wte.weight", "lm_head.weight"}) if cfg.vocab_size > theirs else frozenset()
    try:
        read_weights(model, directory, meta, pieces=_own_partition if partitioned else whole_parameter, grow=grow)
    except CheckpointError as exc:
        raise CheckpointError(f"init_from: {exc}") from None
    rows = list(range(theirs, cfg.vocab_size))
    if mask["added"] and mask["id"] < theirs and kind_of_model(model).masked_training:  # a run that masks
        rows.append(mask["id"])
    if rows:
        known = mask["id"] if mask["added"] else theirs  # the tokens the checkpoint was trained on
        for name, p in model.named_parameters():
            if name in ("wte.weight", "lm_head.weight"):
                _mean_rows(p, rows, known, partitioned)


@torch.no_grad()
def _mean_rows(p: torch.nn.Parameter, rows: list[int], known: int, partitioned: bool) -> None:
    """Set ``rows`` of a [V, D] matrix to the mean of its first ``known`` rows. Under ZeRO-3 each
    process holds a flat slice of it: each sums the known rows' elements it holds, column by column,
    the sums are added up over the parameter's group, and each writes the slice of the new rows it
    holds; no process ever holds the whole matrix."""
    if not partitioned:
        p[rows] = p[:known].float().mean(0).to(p.dtype)
        return
    import deepspeed.comm as dist

    _, parts = _own_partition(p)
    (first, part), D = parts[0], p.ds_shape[1]
    flat = part.view(-1)
    sum_D = torch.zeros(D, dtype=torch.float32, device=flat.device)
    end = min(first + flat.numel(), known * D)  # this slice's elements of the known rows: [first, end)
    at = first
    while at < end:  # a partial first row, whole rows, a partial last row
        col = at % D
        if col == 0 and end - at >= D:
            k = (end - at) // D
            sum_D += flat[at - first:at - first + k * D].float().view(k, D).sum(0)
            at += k * D
        else:
            n = min(D - col, end - at)
            sum_D[col:col + n] += flat[at - first:at - first + n].float()
            at += n
    dist.all_reduce(sum_D, group=p.ds_process_group)
    mean_D = (sum_D / known).to(flat.dtype)
    for r in rows:
        lo, hi = max(r * D, first), min((r + 1) * D, first + flat.numel())
        if lo < hi:
            flat[lo - first:hi - first] = mean_D[lo - r * D:hi - r * D]


def _own_partition(p: torch.nn.Parameter) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
    """A ZeRO-3 parameter's full shape and the elements this process holds: the flattened tensor
    split in equal parts over the parameter's process group (the last padded), this rank's part."""
    import deepspeed.comm as dist

    part = p.ds_tensor
    world = dist.get_world_size(group=p.ds_process_group)
    if getattr(p, "ds_secondary_tensor", None) is not None or hasattr(part, "ds_quant_scale") \
            or part.final_location is not None:
        raise ValueError("init_from under ZeRO-3 reads each rank's partition from the files, which hierarchical "
                         "partitioning (zero_hpz_partition_size), quantized weights and NVMe offload of parameters "
                         "keep elsewhere: leave them out of train.deepspeed_config for this run")
    if part.ds_numel != -(-p.ds_numel // world):
        raise RuntimeError(f"unexpected ZeRO-3 partition of a {list(p.ds_shape)} parameter over {world} ranks: "
                           f"{part.ds_numel} elements (this DeepSpeed version partitions differently)")
    return list(p.ds_shape), [(dist.get_rank(group=p.ds_process_group) * part.ds_numel, part)]


def start_engine(cfg: PretrainConfig, *, device: torch.device, resume: bool) -> tuple[Any, str]:
    """(DeepSpeed engine, the startup lines rank 0 prints): the memory check (a configuration that
    cannot fit is refused before anything is built), ``build_model``, ``deepspeed.initialize``. The
    lines name the ZeRO stage the engine runs, read from the engine itself."""
    import deepspeed

    from dlm_ray.train.op_builds import clear_stale_build_locks

    clear_stale_build_locks()  # else a build killed in an earlier run makes this one wait forever
    tc = cfg.train
    ds_config = deepspeed_config(tc, use_gpu=tc.use_gpu)
    on_gpu = device.type == "cuda"
    with _without_build_notices():
        memory = check_memory(cfg.model, tc.model_copy(update={"zero_stage": zero_stage(ds_config)}),
                              torch.cuda.get_device_properties(device).total_memory if on_gpu else None, on_gpu=on_gpu)
        model = build_model(cfg, ds_config=ds_config, device=device, resume=resume)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               optimizer=make_optimizer(model.parameters(), tc, use_gpu=tc.use_gpu),
                                               config=ds_config)
    weights = str(engine_dtype(ds_config)).removeprefix("torch.")
    source = f", initial weights from {cfg.init_from}" if cfg.init_from and not resume else ""
    line = (f"[train] DeepSpeed engine: ZeRO-{engine.zero_optimization_stage()}, {weights} weights, "
            f"{deepspeed.comm.get_world_size()} workers{source}")
    return engine, f"{memory}\n{line}"




@contextlib.contextmanager
def _without_build_notices() -> Iterator[None]:
    """DeepSpeed prints "DeepSpeed <op> built successfully" on every rank each time it loads a
    compiled op (its communication backend on CPU): the lines it prints are passed on, those not.
    A Ray Train worker's ``print`` goes to the root logger (Ray patches it), hence the filter too."""
    buffer = io.StringIO()
    notices = _DropBuildNotices()
    logging.getLogger().addFilter(notices)
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        logging.getLogger().removeFilter(notices)
        kept = [line for line in buffer.getvalue().splitlines(keepends=True) if not BUILD_NOTICE.match(line)]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()


BUILD_NOTICE = re.compile(r"^DeepSpeed \S+ built successfully\s*$")


class _DropBuildNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not BUILD_NOTICE.match(record.getMessage())
