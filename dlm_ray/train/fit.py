"""Ray Train + DeepSpeed: ``fit()``, the per-worker entry, and the objective by the model's kind.

Each Ray Train worker builds the denoiser, calls ``deepspeed.initialize`` itself (ZeRO 0-3, CPU
offload optional; bf16 on GPU, fp32 on CPU with gloo), and reads its shard of masked, packed rows
from the Ray Data pipeline. The loss is ``dlm_ray.core.diffusion.diffusion_loss`` (for an autoregressive
model, ``dlm_ray.core.autoregressive.next_token_loss`` on unmasked rows). On GPU the optimizer
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

from dlm_ray.core.autoregressive import next_token_loss
from dlm_ray.io.checkpoint import latest_checkpoint, run_dir
from dlm_ray.config.schema import PretrainConfig
from dlm_ray.data.pipeline import DataPosition, packed_dataset
from dlm_ray.core.diffusion import diffusion_loss
from dlm_ray.train.trainer import Trainer
from dlm_ray.core.model import flops_per_token
from dlm_ray.runtime import pace_scheduling


def _loss(engine: Any, b: dict[str, torch.Tensor], cfg: PretrainConfig, mask_id: int) -> torch.Tensor:
    """The step's loss, by the model's kind: the 1/t-weighted masked cross-entropy (full attention;
    block-causal models see the noisy row and the clean row together, BD3-LM) or the next-token loss
    (causal). Fine-tuning rows (LLaDA) score the answer only, each row over its answer length, then
    over the rows."""
    x0, am = b["input_ids"].long(), b["attention_mask"].long()
    sft = "answer_len" in b
    weight = 1.0 / b["answer_len"].float() if sft else None
    if cfg.model.attention == "causal":
        answer = torch.arange(x0.shape[1], device=x0.device)[None, :] >= b["prompt_len"][:, None] if sft else None
        n = len(b["answer_len"]) if sft else (am[:, :-1] & am[:, 1:]).sum().clamp_min(1)
        return next_token_loss(engine(x0, am), x0, am, n, mask_id=mask_id, maskable_BL=answer, row_weight_B=weight)
    clean = {"clean_ids": x0} if cfg.model.attention == "block_causal" else {}
    logits = engine(b["noisy_ids"].long(), am, **clean)
    n = len(b["answer_len"]) if sft else am.sum().clamp_min(1)
    return diffusion_loss(logits, x0, b["loss_mask"], b["p_mask"], n, mask_id=mask_id, row_weight_B=weight)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on each worker: a ``Trainer`` of the run's config, run to its stop reason."""
    cfg = PretrainConfig.model_validate(config["cfg"])
    Trainer(cfg, loss=_loss, flops_per_token=training_flops_per_token(cfg)).train()


def training_flops_per_token(cfg: PretrainConfig) -> float:
    """FLOPs per trained token. A block-diffusion row runs its noisy and clean copies through the
    blocks together (twice the tokens, over a sequence twice as long); only the noisy copy reaches
    the LM head."""
    if cfg.model.attention != "block_causal":
        return flops_per_token(cfg.model, cfg.data.seq_len)
    head = 6.0 * cfg.model.d_model * cfg.model.vocab_size
    return 2 * (flops_per_token(cfg.model, 2 * cfg.data.seq_len) - head) + head


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
    block_size = cfg.model.block_size if cfg.model.attention == "block_causal" else None
    # An autoregressive model trains on the clean rows: the pipeline leaves out the masking.
    diffusion = None if cfg.model.attention == "causal" else cfg.diffusion
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
