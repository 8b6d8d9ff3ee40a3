"""Ray Train + DeepSpeed: the per-worker training loop and ``fit()``.

Each Ray Train worker builds the denoiser, calls ``deepspeed.initialize`` itself (ZeRO 0-3, CPU
offload optional; bf16 on GPU, fp32 on CPU with gloo), and reads its shard of masked, packed rows
from the Ray Data pipeline. The loss is ``dlm_ray.core.diffusion.diffusion_loss`` (for an autoregressive
model, ``dlm_ray.core.autoregressive.next_token_loss`` on unmasked rows). On GPU the optimizer
is torch's fused AdamW; activation checkpointing is per block (``train.activation_checkpointing``);
before training, rank 0 prints DeepSpeed's memory estimate for the model and ZeRO stage, and a
configuration that cannot fit is refused. MFU uses the device's peak FLOP/s by name (none on CPU).
The step loop syncs with the device only at log windows. Checkpoints go
through ``ray.train.report``; rerunning with the same run name resumes from the latest one
(``ray.train.get_checkpoint()``), and ``FailureConfig`` restarts from it after a worker or node loss.

The engine's setup (DeepSpeed config, optimizer, memory check, peak FLOP/s, the model built once)
is in ``engine``, which needs no Ray, so the GPU check runs it on a bare machine.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import ray
import ray.train
import torch

from dlm_ray.core.autoregressive import next_token_loss
from dlm_ray.io.checkpoint import latest_checkpoint, run_dir
from dlm_ray.config.schema import PretrainConfig, TrainConfig
from dlm_ray.data.pipeline import DataPosition, packed_dataset
from dlm_ray.core.diffusion import diffusion_loss, estimate_nelbo, nats_to_bits
from dlm_ray.train.engine import peak_flops, start_engine
from dlm_ray.train.metrics import MetricsLog, console_line
from dlm_ray.core.model import flops_per_token
from dlm_ray.runtime import pace_scheduling, quiet_third_party


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _evaluate(engine: Any, val_shard: Any, cfg: PretrainConfig, mask_id: int, device: torch.device) -> float | None:
    """Held-out NELBO in bits/token, averaged over ranks (each sees its own val rows, every one of
    them up to ``eval_batches`` micro-batches: a last short batch counts too); None when no rank had
    a held-out row, so no figure is made up."""
    model = engine.module
    model.eval()
    total, count = torch.zeros(2, dtype=torch.float64, device=device), 0
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    for batch in val_shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, drop_last=False):
        b = _to_device(batch, device)
        real = b["attention_mask"].bool()
        if "prompt_len" in b:  # fine-tuning: the answer given the prompt
            real = real & (torch.arange(real.shape[1], device=device)[None, :] >= b["prompt_len"][:, None])
        nelbo = estimate_nelbo(model, b["input_ids"].long(), mask_id=mask_id, num_samples=cfg.eval.nelbo_samples,
                               attention_mask=b["attention_mask"].long(), generator=gen, maskable=real)
        total += torch.stack([(nelbo.double() * real.sum(-1)).sum(), real.sum().double()])
        count += 1
        if count >= cfg.train.eval_batches:
            break
    torch.distributed.all_reduce(total)
    model.train()
    return float(nats_to_bits(total[0] / total[1])) if total[1] > 0 else None


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


def _quiet_worker(use_gpu: bool) -> None:
    """Keep third-party noise out of the console, at its source and scoped to it: DeepSpeed's
    accelerator guess (it warns on every rank when it finds no GPU) and the deprecation warnings
    torch.distributed raises for the collectives DeepSpeed calls."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    quiet_third_party()


def _global_position(local: DataPosition, device: torch.device) -> DataPosition:
    """The earliest position any worker has not consumed: every row before it was trained on."""
    mine = torch.tensor(local.to_list(), dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(every, mine)
    return min(DataPosition(*map(int, p.tolist())) for p in every)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = PretrainConfig.model_validate(config["cfg"])
    tc = cfg.train
    _quiet_worker(tc.use_gpu)
    from dlm_ray.io.checkpoint import load_training, save_training
    from dlm_ray.core.tokenizer import load_tokenizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    tok = load_tokenizer(cfg.tokenizer)
    checkpoint = ray.train.get_checkpoint()
    # The model is built once (partitioned at construction under ZeRO-3, init_from's weights read
    # into it); a resume restores its own weights.
    engine, startup = start_engine(cfg, device=device, resume=checkpoint is not None)
    if rank == 0:
        _say(startup)
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", tc)
    state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "position": DataPosition().to_list()}
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_training(Path(d), engine, rank=rank)
    position = DataPosition(*state["position"])
    if checkpoint and rank == 0:
        _say(f"[train] resumed at step {state['step']}, data position {position}")
    log = MetricsLog(run_dir(cfg), resume_step=state["step"], tensorboard=tc.tensorboard) if rank == 0 else None
    flops_tok = training_flops_per_token(cfg)
    val_shard = ray.train.get_dataset_shard("val")
    train_iter = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=tc.micro_batch_size, drop_last=True, local_shuffle_buffer_size=cfg.data.local_shuffle_buffer or None,
        local_shuffle_seed=tc.seed if cfg.data.local_shuffle_buffer else None)
    window_t, window_tokens, micro, data_wait = time.perf_counter(), 0, 0, 0.0
    start_t, start_step = time.perf_counter(), state["step"]
    consumed = position
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    saved = state["step"]

    def save(record: dict[str, Any], consumed: DataPosition) -> int:
        """A checkpoint of this step, reported with the step's record; every rank takes part."""
        state["position"] = _global_position(consumed, device).to_list()
        if log is not None:
            log.flush()
        with tempfile.TemporaryDirectory() as d:
            save_training(Path(d), engine, rank=rank, state=state, cfg=cfg)
            ray.train.report({**record, "step": state["step"]}, checkpoint=ray.train.Checkpoint.from_directory(d))
        return state["step"]

    for waited, batch in _timed(train_iter):
        data_wait += waited
        after = DataPosition.after_rows({c: batch[c].numpy() for c in ("epoch", "item_index", "row_index")})
        if after <= position:
            continue  # an in-run restart replays the stream from where fit() started it
        if state["step"] >= tc.max_steps:
            break
        consumed = max(consumed, after)
        b = _to_device(batch, device)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr_at(state["step"], tc)
        loss = _loss(engine, b, cfg, tok.mask_id)
        engine.backward(loss)
        engine.step()
        micro += 1
        # Logged per maskable token (the bound's own unit): the objective divides by every real token,
        # and a conditional row's prompt is real but never masked. Host counts: no device sync.
        loss_sum += loss.detach() * _per_maskable(batch)
        window_tokens += int(batch["attention_mask"].sum()) * world  # the host copy: no device sync
        if micro % tc.grad_accum:
            continue
        state["step"] += 1
        state["tokens_seen"] += tc.batch_size * cfg.data.seq_len
        step = state["step"]
        record: dict[str, Any] = {}
        if step % tc.log_every == 0 or step == tc.max_steps:
            dt = time.perf_counter() - window_t
            tps = window_tokens / dt
            record = {"step": step, "loss": float(loss_sum) / max(1, micro), "lr": lr_at(step - 1, tc),
                      "grad_norm": float(engine.get_global_grad_norm() or 0.0), "tokens_per_s": tps,
                      "mfu": tps * flops_tok / (peak * world) if peak else None,
                      "tokens_seen": state["tokens_seen"], "epoch": consumed.epoch, "data_wait_frac": data_wait / dt}
            window_t, window_tokens, micro, data_wait = time.perf_counter(), 0, 0, 0.0
            loss_sum.zero_()
        if step % tc.eval_every == 0 or step == tc.max_steps:
            record = {**record, "step": step, "val_nelbo_bits": _evaluate(engine, val_shard, cfg, tok.mask_id, device)}
        if step == start_step + 1:  # the ETA's clock starts after the first step: start-up is not a step's cost
            start_t = time.perf_counter()
        if record and log is not None:
            log.log(record)
            per_step = (time.perf_counter() - start_t) / (step - start_step - 1) if step > start_step + 1 else None
            _say(console_line(record, max_steps=tc.max_steps, seconds_per_step=per_step))
        if step % tc.checkpoint_every == 0 or step == tc.max_steps:
            if step == tc.max_steps:
                record["stop_reason"] = "max_steps"
            saved = save(record, consumed)
        elif record:
            ray.train.report(record)
        if tc.fail_once_at_step == step:
            _fail_once(cfg, rank)
        if step >= tc.max_steps:
            break
    if state["step"] < tc.max_steps:  # the stream ended first: say so, and keep the last step
        _data_ran_out(state["step"], start_step, tc, rank)
        record = {"step": state["step"], "stop_reason": "data_exhausted"}
        if state["step"] not in (saved, 0):
            record["val_nelbo_bits"] = _evaluate(engine, val_shard, cfg, tok.mask_id, device)
            if log is not None:
                log.log(record)
            save(record, consumed)
        else:
            ray.train.report(record)
    if log is not None:
        log.close()


def _data_ran_out(step: int, start_step: int, tc: TrainConfig, rank: int) -> None:
    """Training stops before ``max_steps`` when the stream ends: a line that says why, or an error
    when not one step could be taken (nothing to checkpoint or export)."""
    if step == start_step == 0:
        raise RuntimeError("the training data gave no micro-batch: the corpus is empty, or smaller than one "
                           f"micro-batch of {tc.micro_batch_size} rows per worker")
    if rank == 0:
        _say(f"[train] stopped at step {step} of {tc.max_steps}: the data ran out after train.max_epochs="
             f"{tc.max_epochs} epochs (raise it, or lower train.max_steps)")


def _per_maskable(batch: dict[str, torch.Tensor]) -> float:
    """Real tokens over maskable ones in a pretraining batch (1 for fine-tuning and autoregressive rows)."""
    if "num_maskable" not in batch or "answer_len" in batch:
        return 1.0
    return float(batch["attention_mask"].sum()) / max(1, int(batch["num_maskable"].sum()))


def training_flops_per_token(cfg: PretrainConfig) -> float:
    """FLOPs per trained token. A block-diffusion row runs its noisy and clean copies through the
    blocks together (twice the tokens, over a sequence twice as long); only the noisy copy reaches
    the LM head."""
    if cfg.model.attention != "block_causal":
        return flops_per_token(cfg.model, cfg.data.seq_len)
    head = 6.0 * cfg.model.d_model * cfg.model.vocab_size
    return 2 * (flops_per_token(cfg.model, 2 * cfg.data.seq_len) - head) + head


def _say(line: str) -> None:
    """A line on the worker's stdout, which the driver shows. Not ``print``: Ray Train patches it to
    log the line as well, and the driver then shows it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _timed(batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[tuple[float, dict[str, torch.Tensor]]]:
    """(seconds spent waiting for the batch, batch): the data-wait metric counts only this wait,
    not evaluation or checkpointing between steps."""
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield time.perf_counter() - t, batch


class InjectedFault(RuntimeError):
    """Raised by the fault drill (``train.fail_once_at_step``)."""


def _fail_once(cfg: PretrainConfig, rank: int) -> None:
    """Raise once per run and rank: a marker in the run directory (any filesystem) says it happened."""
    import pyarrow.fs as pafs

    from dlm_ray.data.sources import filesystem_for

    filesystem, root = filesystem_for(run_dir(cfg))
    marker = f"{root}/.fault_injected_rank{rank}"
    if filesystem.get_file_info(marker).type == pafs.FileType.NotFound:
        filesystem.create_dir(root, recursive=True)
        with filesystem.open_output_stream(marker) as f:
            f.write(b"1")
        raise InjectedFault(f"injected fault after step {cfg.train.fail_once_at_step} (rank {rank})")


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
