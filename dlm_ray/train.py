"""Ray Train + DeepSpeed: the per-worker training loop and ``fit()``.

Each Ray Train worker builds the denoiser, calls ``deepspeed.initialize`` itself (ZeRO 0-3, CPU
offload optional; bf16 on GPU, fp32 on CPU with gloo), and reads its shard of masked, packed rows
from the Ray Data pipeline. The loss is ``dlm_ray.diffusion.diffusion_loss``. Checkpoints go
through ``ray.train.report``; rerunning with the same run name resumes from the latest one
(``ray.train.get_checkpoint()``), and ``FailureConfig`` restarts from it after a worker or node loss.

This is the only module that imports DeepSpeed.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import ray
import ray.train
import torch

from dlm_ray.config import PretrainConfig, TrainConfig
from dlm_ray.data import masked_dataset
from dlm_ray.diffusion import diffusion_loss, estimate_nelbo, nats_to_bits
from dlm_ray.model import Denoiser, flops_per_token
from dlm_ray.sources import filesystem_for

CPU_PEAK_FLOPS = 1e11  # rough peak for a 2-core CPU worker; set train.peak_flops for real hardware


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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
    if tc.deepspeed_config:
        override = json.loads(Path(tc.deepspeed_config).read_text())
        cfg = {**cfg, **override}
    return cfg


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _evaluate(engine: Any, val_shard: Any, cfg: PretrainConfig, mask_id: int, device: torch.device) -> float:
    """Held-out NELBO in bits/token, averaged over ranks (each sees its own val rows)."""
    model = engine.module
    model.eval()
    total, count = torch.zeros(2, dtype=torch.float64, device=device), 0
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    for batch in val_shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, drop_last=True):
        b = _to_device(batch, device)
        real = b["attention_mask"].bool()
        nelbo = estimate_nelbo(model, b["input_ids"].long(), mask_id=mask_id, num_samples=cfg.eval.nelbo_samples,
                               attention_mask=b["attention_mask"].long(), generator=gen)
        total += torch.stack([(nelbo.double() * real.sum(-1)).sum(), real.sum().double()])
        count += 1
        if count >= cfg.train.eval_batches:
            break
    torch.distributed.all_reduce(total)
    model.train()
    return float(nats_to_bits(total[0] / total[1].clamp_min(1)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed

    from dlm_ray.checkpoint import load_training, save_training
    from dlm_ray.tokenizer import load_tokenizer

    cfg = PretrainConfig.model_validate(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    tok = load_tokenizer(cfg.tokenizer)
    model = Denoiser(cfg.model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(tc, use_gpu=tc.use_gpu))
    state = {"step": 0, "tokens_seen": 0, "epoch": 0, "batches_into_epoch": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_training(Path(d), engine, rank=rank)
        if rank == 0:
            _say(f"[train] resumed at step {state['step']} (epoch {state['epoch']})")
    flops_tok = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = tc.peak_flops or CPU_PEAK_FLOPS
    val_shard = ray.train.get_dataset_shard("val")
    # Resume at the epoch in progress and skip this worker's batches already taken from it. fit()
    # starts the stream at that epoch; after an in-run restart the stream starts over, and earlier
    # epochs are passed over here.
    skip = state["batches_into_epoch"] * tc.grad_accum
    train_iter = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=tc.micro_batch_size, drop_last=True, local_shuffle_buffer_size=cfg.data.local_shuffle_buffer or None,
        local_shuffle_seed=tc.seed if cfg.data.local_shuffle_buffer else None)
    window_t, window_tokens, window_loss, micro, data_wait = time.perf_counter(), 0, [], 0, 0.0
    if rank == 0:
        _say(f"[train] torch threads {torch.get_num_threads()}, device {device}")
    for waited, batch in _timed(train_iter):
        data_wait += waited
        if int(batch["epoch"][0]) < state["epoch"]:
            continue
        if skip:
            skip -= 1
            continue
        if state["step"] >= tc.max_steps:
            break
        epoch = int(batch["epoch"][0])
        if epoch != state["epoch"]:
            state["epoch"], state["batches_into_epoch"] = epoch, 0
        b = _to_device(batch, device)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr_at(state["step"], tc)
        logits = engine(b["noisy_ids"].long(), b["attention_mask"].long())
        n_real = b["attention_mask"].sum().clamp_min(1)
        loss = diffusion_loss(logits, b["input_ids"].long(), b["loss_mask"], b["p_mask"], n_real, mask_id=tok.mask_id)
        engine.backward(loss)
        engine.step()
        micro += 1
        window_loss.append(loss.item())
        window_tokens += int(n_real) * world
        if micro % tc.grad_accum:
            continue
        state["step"] += 1
        state["batches_into_epoch"] += 1
        state["tokens_seen"] += tc.batch_size * cfg.data.seq_len
        metrics: dict[str, Any] = {}
        step = state["step"]
        if step % tc.log_every == 0 or step == tc.max_steps:
            dt = time.perf_counter() - window_t
            tps = window_tokens / dt
            metrics = {"step": step, "loss": float(np.mean(window_loss)), "lr": lr_at(step - 1, tc),
                       "grad_norm": float(engine.get_global_grad_norm() or 0.0), "tokens_per_s": tps,
                       "mfu": tps * flops_tok / (peak * world), "tokens_seen": state["tokens_seen"],
                       "epoch": state["epoch"], "data_wait_frac": data_wait / dt}
            window_t, window_tokens, window_loss, data_wait = time.perf_counter(), 0, [], 0.0
        if step % tc.eval_every == 0 or step == tc.max_steps:
            metrics = {**metrics, "step": step, "val_nelbo_bits": _evaluate(engine, val_shard, cfg, tok.mask_id, device)}
        if metrics:
            state["history"].append(metrics)
            if rank == 0:
                _say("[train] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in metrics.items()))
        if step % tc.checkpoint_every == 0 or step == tc.max_steps:
            with tempfile.TemporaryDirectory() as d:
                save_training(Path(d), engine, rank=rank, state=state, cfg=cfg)
                ray.train.report({**metrics, "step": step, "history": state["history"]},
                                 checkpoint=ray.train.Checkpoint.from_directory(d))
        elif metrics:
            ray.train.report({**metrics, "history": state["history"]})
        if tc.fail_once_at_step == step:
            _fail_once(cfg, rank)
        if step >= tc.max_steps:
            break


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
    marker = Path(run_dir(cfg)) / f".fault_injected_rank{rank}"
    if "://" not in run_dir(cfg) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise InjectedFault(f"injected fault after step {cfg.train.fail_once_at_step} (rank {rank})")


# ------------------------------------------------------------------------------------------ driver


def run_dir(cfg: PretrainConfig) -> str:
    """The run's directory: ``<storage_path>/<run_name>``, local paths made absolute."""
    base = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    return f"{base.rstrip('/')}/{cfg.run_name}"


def latest_checkpoint(cfg: PretrainConfig) -> tuple[str, dict[str, Any]] | None:
    """(path, trainer state) of the newest complete checkpoint of the run, or None for a new run.

    A run directory with checkpoint folders but no readable state is an error: resuming must never
    quietly become a fresh start over an existing run.
    """
    import pyarrow.fs as pafs

    from dlm_ray.checkpoint import STATE_FILE, CheckpointError

    uri = run_dir(cfg)
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    entries = fs.get_file_info(pafs.FileSelector(path))
    ckpts = sorted(e.path for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_"))
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


def fit(cfg: PretrainConfig) -> ray.train.Result:
    """Train on the configured corpus; resumes the run of the same name if it has a checkpoint."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train.torch import TorchTrainer

    from dlm_ray.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    resume = latest_checkpoint(cfg)
    start_epoch = resume[1]["epoch"] if resume else 0
    if resume:
        print(f"[fit] resuming {run_dir(cfg)} from {resume[0]} (step {resume[1]['step']})", flush=True)
    tc = cfg.train
    ray.data.DataContext.get_current().enable_progress_bars = cfg.data.progress_bars
    datasets = {
        "train": masked_dataset(cfg.data, cfg.tokenizer, cfg.diffusion, "train", num_epochs=tc.max_epochs,
                                start_epoch=start_epoch),
        "val": masked_dataset(cfg.data, cfg.tokenizer, cfg.diffusion, "val"),
    }
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
        ),
        datasets=datasets,
        # Ordered streams: epochs arrive one after another (the resume position counts batches into
        # the current epoch), and a rerun feeds the same rows in the same order.
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(
            preserve_order=True,
            resource_limits=ExecutionResources.for_limits(object_store_memory=cfg.data.prefetch_mb * 2**20))),
    )
    return trainer.fit()


def write_summary(cfg: PretrainConfig, history: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """``summary.json`` and ``loss_curve.png`` in the run directory; returns the summary."""
    import io


    summary = {"run": run_dir(cfg), **extra,
               "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
               "final_val_nelbo_bits": next((h["val_nelbo_bits"] for h in reversed(history) if "val_nelbo_bits" in h), None)}
    uri = run_dir(cfg)
    fs, path = filesystem_for(uri)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/summary.json") as f:
        f.write(json.dumps({**summary, "history": history}, indent=2).encode())
    png = io.BytesIO()
    _plot(history, png)
    with fs.open_output_stream(f"{path}/loss_curve.png") as f:
        f.write(png.getvalue())
    return summary


def _plot(history: list[dict[str, Any]], out: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    pts = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if pts:
        ax.plot(*zip(*pts), label="train loss (NELBO bound, nats/token)")
    val = [(h["step"], h["val_nelbo_bits"] * math.log(2)) for h in history if "val_nelbo_bits" in h]
    if val:
        ax.plot(*zip(*val), "o-", label="held-out NELBO (nats/token)")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
