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
"""

from __future__ import annotations

from typing import Any

import ray
import ray.train
import torch

from dlm_ray.io.checkpoint import latest_checkpoint, run_dir
from dlm_ray.config.schema import PretrainConfig
from dlm_ray.data.pipeline import DataPosition, packed_dataset
from dlm_ray.core.kinds import kind_of
from dlm_ray.train.trainer import Trainer
from dlm_ray.runtime import pace_scheduling


def _loss(engine: Any, b: dict[str, torch.Tensor], cfg: PretrainConfig, mask_id: int) -> torch.Tensor:
    """The step's loss: the model kind's (``kinds``): the 1/t-weighted masked cross-entropy, over the
    noisy and clean rows together for block diffusion, or the next-token loss."""
    return kind_of(cfg.model).loss(engine, b, mask_id=mask_id)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on each worker: a ``Trainer`` of the run's config, run to its stop reason."""
    cfg = PretrainConfig.model_validate(config["cfg"])
    Trainer(cfg, loss=_loss, flops_per_token=training_flops_per_token(cfg)).train()


def training_flops_per_token(cfg: PretrainConfig) -> float:
    """FLOPs per trained token, as the model's kind runs a row (block diffusion: both copies)."""
    return kind_of(cfg.model).flops_per_token(cfg.data.seq_len)


# ------------------------------------------------------------------------------------------ driver


def with_init_from(cfg: PretrainConfig) -> PretrainConfig:
    """The run's config with ``init_from``'s model shape and tokenizer (its tokenizer file by absolute
    path, its token ids from its config): a fine-tune must read text as the model was trained to."""
    if not cfg.init_from:
        return cfg
    from dlm_ray.io.checkpoint import local_path, read_inference_config

    meta, _ = read_inference_config(cfg.init_from)
    tokenizer = dict(meta["tokenizer"])
    if tokenizer.get("kind") == "hf":
        tokenizer["path"] = str(local_path(cfg.init_from).resolve() / tokenizer["path"])
    out = PretrainConfig.model_validate({**cfg.to_dict(), "model": meta["model"], "tokenizer": tokenizer})
    return out


def fit(cfg: PretrainConfig) -> ray.train.Result:
    """Train on the configured corpus; resumes the run of the same name if it has a checkpoint."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train.torch import TorchTrainer

    from dlm_ray.core.tokenizer import load_tokenizer

    cfg = with_init_from(cfg.with_absolute_paths())  # workers run elsewhere: no relative path reaches them
    tok = load_tokenizer(cfg.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    resume = latest_checkpoint(cfg)
    start = DataPosition()
    if resume:
        state = resume[1]
        # Checkpoints from before positions were recorded hold only the epoch.
        start = DataPosition(*state["position"]) if "position" in state else DataPosition(state.get("epoch", 0))
        print(f"[fit] resuming {run_dir(cfg)} from {resume[0]} (step {state['step']}, data position {start})",
              flush=True)
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
                                diffusion=diffusion, strata=tc.micro_batch_size, block_size=block_size),
        "val": packed_dataset(cfg.data, cfg.tokenizer, "val", diffusion=diffusion, block_size=block_size),
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
        # Ordered streams: rows arrive in stream order (the resume position is a place in it), and a
        # rerun feeds the same rows in the same order.
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(
            preserve_order=True,
            resource_limits=ExecutionResources.for_limits(object_store_memory=cfg.data.prefetch_mb * 2**20))),
    )
    return trainer.fit()
