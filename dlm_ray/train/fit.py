"""Ray Train + DeepSpeed: ``fit()``, the per-worker entry, and the objective by the model's kind.

Each Ray Train worker builds the denoiser, calls ``deepspeed.initialize`` itself (ZeRO 0-3, CPU
offload optional; bf16 on GPU, fp32 on CPU with gloo), and reads its shard of masked, packed rows
from the Ray Data pipeline. The loss is the model kind's (``dlm_ray.core.kinds``: the masked
diffusion loss, or for an autoregressive model the next-token loss on unmasked rows). On GPU the optimizer
is torch's fused AdamW; activation checkpointing is per block (``train.activation_checkpointing``);
before training, rank 0 prints DeepSpeed's memory estimate for the model and ZeRO stage, and a
configuration that cannot fit is refused. MFU uses the device's peak FLOP/s by name (none on CPU).
The step loop (``trainer.Trainer``) syncs with the device only at log windows. Checkpoints go
through ``ray.train.report``; rerunning with the same run name resumes from the latest one
(``ray.train.get_checkpoint()``), and ``FailureConfig`` restarts from it after a worker or node loss.

The engine's setup (DeepSpeed config, optimizer, memory check, peak FLOP/s, the model built once)
is in ``engine``, which needs no Ray, so the GPU check runs it on a bare machine.

On the driver, ``with_init_from`` lays the run's config over ``init_from``'s: what the run gives
explicitly wins where the weights allow it, and a diffusion attention on an autoregressive
checkpoint turns on the adaptation recipe (``AdaptConfig``; its schedules are ``core.adapt``'s).
"""

from __future__ import annotations

from typing import Any, Callable

import ray
import ray.train
import torch

from dlm_ray.io.checkpoint import latest_checkpoint, run_dir
from dlm_ray.config.schema import MODEL_PRESETS, AdaptConfig, ModelConfig, PretrainConfig
from dlm_ray.core.adapt import warmup_block_sizes
from dlm_ray.data.pipeline import DataPosition, packed_dataset
from dlm_ray.core.kinds import kind_of
from dlm_ray.train.metrics import MetricsLog, read_metrics
from dlm_ray.train.trainer import Trainer
from dlm_ray.io.evaluations import unjoined
from dlm_ray.runtime import pace_scheduling


def _loss(engine: Any, b: dict[str, torch.Tensor], cfg: PretrainConfig,
          mask_id: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's objective and the figures logged for it: the model kind's loss (``kinds``): the
    1/t-weighted masked cross-entropy, over the noisy and clean rows together for block diffusion, or
    the next-token loss; with ``diffusion.cap_weight`` the confidence term is added to the objective
    and logged on its own ("cap_entropy"), while "loss" stays the bound."""
    figures: dict[str, torch.Tensor] = {}
    objective = kind_of(cfg.model).loss(engine, b, mask_id=mask_id, cap_weight=cfg.diffusion.cap_weight,
                                        figures=figures)
    return objective, figures


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on each worker: a ``Trainer`` of the run's config, run to its stop reason."""
    cfg = PretrainConfig.model_validate(config["cfg"])
    Trainer(cfg, loss=_loss, flops_per_token=training_flops_per_token(cfg)).train()


def training_flops_per_token(cfg: PretrainConfig) -> float:
    """FLOPs per trained token, as the model's kind runs a row (block diffusion: both copies), twice
    over with complementary masks (each row runs as drawn and as the complement)."""
    pairs = 2 if cfg.diffusion.complementary and kind_of(cfg.model).masked_training else 1
    return pairs * kind_of(cfg.model).flops_per_token(cfg.data.seq_len)


# ------------------------------------------------------------------------------------------ driver


def _validation(cfg: PretrainConfig, evaluator: Callable[..., dict[str, Any]] | None) -> Any:
    """Ray Train's ``ValidationConfig`` for a run that evaluates its checkpoints off the path, else None."""
    if not cfg.eval.on_checkpoints:
        return None
    if evaluator is None:
        raise ValueError("eval.on_checkpoints needs an evaluator: fit(cfg, evaluator=dlm_ray.eval.checkpoints."
                         "evaluate_checkpoint), as jobs/pretrain.py passes it")
    from ray.train import ValidationConfig, ValidationTaskConfig

    return ValidationConfig(fn=evaluator, task_config=ValidationTaskConfig(fn_kwargs={"cfg": cfg.to_dict()}),
                            ray_remote_kwargs={"num_cpus": cfg.eval.cpus, "num_gpus": cfg.eval.gpus})


# The model settings that are its weights' own: given explicitly with init_from, each must equal the
# checkpoint's (n_kv_heads and head_dim compared as resolved: None means n_heads, d_model / n_heads).
WEIGHT_SETTINGS = {"vocab_size": "vocab_size", "d_model": "d_model", "n_layers": "n_layers", "n_heads": "n_heads",
                   "n_kv_heads": "kv_heads", "head_dim": "head_size", "d_mlp": "d_mlp", "qkv_bias": "qkv_bias",
                   "qk_norm": "qk_norm", "tie_embeddings": "tie_embeddings", "rope_theta": "rope_theta",
                   "norm_eps": "norm_eps", "noise": "noise"}  # embedding diffusion has inputs of its own


def given_model_settings(model: ModelConfig) -> set[str]:
    """The model settings a run gives explicitly (a file, an override): fields set on the config,
    less the default preset's own values (a preset other than the default counts as given)."""
    given = set(model.model_fields_set) - {"preset"}
    if model.preset is not None and model.preset == PretrainConfig().model.preset:
        preset = MODEL_PRESETS[model.preset]
        given -= {k for k, v in preset.items() if getattr(model, k) == v}
    return given


def with_init_from(cfg: PretrainConfig) -> PretrainConfig:
    """The run's config with ``init_from``'s model and tokenizer (its tokenizer file by absolute path,
    its token ids from its config): a run must read text as the model was trained to.

    A model setting the run gives explicitly wins where the weights allow it (attention, block_size,
    shift_logits, a shorter max_seq_len); one that contradicts the weights is refused by name. A
    diffusion attention on an autoregressive checkpoint adapts it (``AdaptConfig``): the shift on
    unless given, the recipe's learning rate and warm-up unless ``train`` gives them, complementary
    masks for block diffusion unless ``diffusion`` gives them. Applying it twice changes nothing."""
    if not cfg.init_from:
        return cfg
    from dlm_ray.io.checkpoint import local_path, read_inference_config

    # A checkpoint that cannot say its kind (an A2D directory) is taken as the kind the run names.
    named = {"attention": cfg.model.attention, "block_size": cfg.model.block_size}
    meta, _ = read_inference_config(cfg.init_from,
                                    default_kind=named if "attention" in given_model_settings(cfg.model) else None)
    tokenizer = dict(meta["tokenizer"])
    if tokenizer.get("kind") == "hf":
        tokenizer["path"] = str(local_path(cfg.init_from).resolve() / tokenizer["path"])
    # An autoregressive tokenizer gains a mask token; the embedding grows to hold it (init_from fills it).
    vocab = meta.get("mask_token", {}).get("vocab_size", meta["model"]["vocab_size"])
    ckpt = ModelConfig.model_validate({**meta["model"], "vocab_size": vocab, "preset": None})
    model = _model_over(ckpt, cfg.model, where=f"init_from {cfg.init_from}")
    adapting = not kind_of(ckpt).masked_training and kind_of(model).masked_training
    update: dict[str, Any] = {}
    if adapting:
        if "shift_logits" not in given_model_settings(cfg.model):
            model = model.model_copy(update={"shift_logits": True})
        update = _recipe(cfg, kind_of(model).block_size is not None)
    else:
        _check_not_adapting(cfg)
    out = PretrainConfig.model_validate({**cfg.to_dict(), **update, "model": model.to_dict(), "tokenizer": tokenizer})
    if out.data.seq_len > out.model.max_seq_len:
        raise ValueError(f"data.seq_len={out.data.seq_len} exceeds init_from's model.max_seq_len={out.model.max_seq_len}")
    return out


def _model_over(ckpt: ModelConfig, run: ModelConfig, *, where: str) -> ModelConfig:
    """The checkpoint's model with the run's given settings that its weights allow; the rest refused."""
    given = given_model_settings(run)
    wrong = [f"model.{k}={getattr(run, k)} (its weights have {ours}={getattr(ckpt, ours)})"
             for k, ours in sorted(WEIGHT_SETTINGS.items()) if k in given and getattr(run, ours) != getattr(ckpt, ours)]
    if "max_seq_len" in given and run.max_seq_len > ckpt.max_seq_len:
        wrong.append(f"model.max_seq_len={run.max_seq_len} (its positions were trained up to {ckpt.max_seq_len}; "
                     "a shorter context is allowed)")
    if wrong:
        raise ValueError(f"{where}: {'; '.join(wrong)}: the run cannot change what the weights are; leave these "
                         "settings out or start from another checkpoint")
    honoured = {k: getattr(run, k) for k in given - set(WEIGHT_SETTINGS)}
    return ModelConfig.model_validate({**ckpt.to_dict(), **honoured})


def _recipe(cfg: PretrainConfig, block: bool) -> dict[str, Any]:
    """The adaptation's sections: ``adapt.from_causal`` on; the recipe's lr and warm-up where ``train``
    does not give them; complementary masks for block diffusion unless ``diffusion`` says."""
    defaults = AdaptConfig()
    if block and cfg.adapt.anneal_steps != defaults.anneal_steps:
        raise ValueError("adapt.anneal_steps anneals full attention; a block diffusion adaptation warms up its "
                         "block size instead (adapt.block_warmup_steps)")
    if not block and cfg.adapt.block_warmup_steps != defaults.block_warmup_steps:
        raise ValueError("adapt.block_warmup_steps is for block diffusion (model.attention: block_causal); a "
                         "full-attention adaptation anneals (adapt.anneal_steps)")
    train = cfg.train.to_dict()
    for name in ("lr", "warmup_steps"):
        if name not in cfg.train.model_fields_set:
            train[name] = getattr(cfg.adapt, name)
    diffusion = cfg.diffusion.to_dict()
    if block and "complementary" not in cfg.diffusion.model_fields_set:
        diffusion["complementary"] = True
    return {"adapt": {**cfg.adapt.to_dict(), "from_causal": True}, "train": train, "diffusion": diffusion}


def _check_not_adapting(cfg: PretrainConfig) -> None:
    """A run that adapts nothing refuses the recipe's settings rather than ignore them."""
    defaults = AdaptConfig()
    changed = [f"adapt.{k}={v}" for k, v in cfg.adapt.to_dict().items() if v != getattr(defaults, k)]
    if changed:
        raise ValueError(f"{', '.join(changed)}: the adaptation recipe applies to a diffusion run "
                         "(model.attention: full or block_causal) from an autoregressive init_from; this run "
                         "adapts nothing")


def adaptation_line(cfg: PretrainConfig) -> str | None:
    """What an adaptation run does, in one line (None for any other run)."""
    if not cfg.adapt.from_causal:
        return None
    kind, a, tc = kind_of(cfg.model), cfg.adapt, cfg.train
    if kind.block_size is None:
        schedule = f"attention annealed from causal to full over {a.anneal_steps} steps"
    else:
        sizes = " -> ".join(map(str, [*warmup_block_sizes(kind.block_size), kind.block_size]))
        warmup = f"blocks {sizes} ({a.block_warmup_steps} steps each)" if a.block_warmup_steps else "no block warm-up"
        schedule = f"{warmup}, complementary masks {'on' if cfg.diffusion.complementary else 'off'}"
    return (f"[adapt] autoregressive -> {kind.noun} diffusion model: shift {'on' if cfg.model.shift_logits else 'off'}, "
            f"{schedule}, lr {tc.lr:g} after {tc.warmup_steps} warm-up steps")


def fit(cfg: PretrainConfig, *, evaluator: Callable[..., dict[str, Any]] | None = None) -> ray.train.Result:
    """Train on the configured corpus; resumes the run of the same name if it has a checkpoint. With
    ``eval.on_checkpoints``, ``evaluator`` (``eval.checkpoints.evaluate_checkpoint``) scores each one."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train.torch import TorchTrainer

    from dlm_ray.core.tokenizer import load_tokenizer

    cfg = with_init_from(cfg.with_absolute_paths())  # workers run elsewhere: no relative path reaches them
    tok = load_tokenizer(cfg.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    start = _start_position(cfg)
    tc = cfg.train
    kind = kind_of(cfg.model)
    block_size = kind.block_size  # block diffusion: each block noised at its own level
    # An autoregressive model trains on the clean rows: the pipeline leaves out the masking.
    diffusion = cfg.diffusion if kind.masked_training else None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.data.progress_bars
    ctx.print_on_execution_start = cfg.data.progress_bars  # the dataset plan lines, with the bars
    datasets = {
        "train": packed_dataset(cfg.data, cfg.tokenizer, "train", num_epochs=tc.max_epochs, start=start,
                                diffusion=diffusion, strata=tc.micro_batch_size, block_size=block_size,
                                given=kind.reads_given),
        # Held-out rows are scored by estimate_nelbo, which draws its own masks: no pairs needed.
        "val": packed_dataset(cfg.data, cfg.tokenizer, "val", block_size=block_size, diffusion=diffusion and
                              diffusion.model_copy(update={"complementary": False})),
    }
    for ds in datasets.values():
        pace_scheduling(ds.context, cfg.data.pacing)
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if tc.use_gpu else {}),
                 **tc.worker_resources}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict()},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=run_dir(cfg).rsplit("/", 1)[0],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            # Ray Train's INFO lines (a dump of every report) stay in its log files.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        validation_config=_validation(cfg, evaluator),  # eval.on_checkpoints: a task per checkpoint
        # Ordered streams: rows arrive in stream order (the resume position is a place in it), and a
        # rerun feeds the same rows in the same order.
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(
            preserve_order=True,
            resource_limits=ExecutionResources.for_limits(object_store_memory=cfg.data.prefetch_mb * 2**20))),
    )
    try:
        result = trainer.fit()
    finally:  # a failed run keeps the evaluations it finished too
        if cfg.eval.on_checkpoints:
            _join_last_evaluations(cfg)
    return result


def _start_position(cfg: PretrainConfig) -> DataPosition:
    """Where the data stream starts: the latest committed checkpoint's position, or the beginning."""
    resume = latest_checkpoint(cfg)
    if not resume:
        return DataPosition()
    state = resume[1]
    # Checkpoints from before positions were recorded hold only the epoch.
    start = DataPosition(*state["position"]) if "position" in state else DataPosition(state.get("epoch", 0))
    print(f"[fit] resuming {run_dir(cfg)} from {resume[0]} (step {state['step']}, data position {start})", flush=True)
    return start


def _join_last_evaluations(cfg: PretrainConfig) -> None:
    """Add to metrics.jsonl (and TensorBoard) the checkpoint evaluations that finished after the last
    step (Ray Train waits for them before ``fit`` returns; the workers are gone by then)."""
    last = max((r.get("step", 0) for r in read_metrics(run_dir(cfg))), default=0)  # every record kept
    log = MetricsLog(run_dir(cfg), resume_step=last, tensorboard=cfg.train.tensorboard)
    for record in unjoined(run_dir(cfg), log.records):
        log.log(record)
    log.close()
