"""The worker side of training: a ``Trainer`` of small named steps with explicit stop reasons.

Each Ray Train worker builds one ``Trainer``: its DeepSpeed engine (``engine.start_engine``), the
state restored from Ray Train's checkpoint, the metrics log (rank 0), and its shard of the masked,
packed rows. ``train()`` is the whole loop::

    while should_continue(): step(batch); [log_window(), evaluate(), checkpoint(record)]

``step`` runs one micro-batch; every ``grad_accum`` of them make an optimizer step, after which the
log window closes (every ``log_every`` steps), the held-out set is scored (every ``eval_every``;
with ``eval.on_checkpoints`` not here but by a task per checkpoint) and a checkpoint is reported
(every ``checkpoint_every``, uploaded in the background: ``upload``), each also at the last step. Training stops
for one of two reasons, ``"max_steps"`` or ``"data_exhausted"``, and the stop is always
checkpointed with its reason in the final record. The objective is handed in (its kind is not the
loop's business), so is the FLOPs-per-token figure behind MFU. The loop syncs with the device only
at log windows. A run adapting an autoregressive checkpoint hands the loss a model call with the
step's attention (``scheduled_model``), and rows with complementary masks train as both views.
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import ray
import ray.train
import torch

from dlm_ray.config.schema import PretrainConfig, TrainConfig
from dlm_ray.core.adapt import training_attention
from dlm_ray.core.diffusion import nats_to_bits, with_complements
from dlm_ray.core.likelihood import nelbo_totals
from dlm_ray.data.pipeline import DataPosition
from dlm_ray.io.checkpoint import run_dir
from dlm_ray.io.evaluations import unjoined
from dlm_ray.runtime import quiet_third_party
from dlm_ray.train.engine import peak_flops, start_engine
from dlm_ray.train.metrics import MetricsLog, console_line, run_marker, say
from dlm_ray.train.upload import clear_staged, staging_dir, upload_fn

# (engine, batch on the device, run config, mask id) -> the micro-batch's scalar objective, or
# (objective, {name: scalar figure to log}); "loss" is logged as the objective unless given.
LossOut = torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]
LossFn = Callable[[Any, dict[str, torch.Tensor], PretrainConfig, int], LossOut]


class Trainer:
    """One worker's training run, from its (possibly resumed) state to a stop reason."""

    def __init__(self, cfg: PretrainConfig, *, loss: LossFn, flops_per_token: float) -> None:
        _quiet_worker(cfg.train.use_gpu)
        from dlm_ray.core.tokenizer import load_tokenizer

        self.cfg, self.tc, self.loss_fn, self.flops_per_token = cfg, cfg.train, loss, flops_per_token
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(self.tc.seed)
        np.random.seed(self.tc.seed)
        self.mask_id = load_tokenizer(cfg.tokenizer).mask_id
        clear_staged(cfg, self.rank)  # what this rank staged before a restart will never be uploaded
        self._restore(ray.train.get_checkpoint())
        self.log = (MetricsLog(run_dir(cfg), resume_step=self.state["step"], tensorboard=self.tc.tensorboard)
                    if self.rank == 0 else None)
        if self.log is not None and self.state["step"]:  # the history says where each restart picked up
            self.log.log({"step": self.state["step"], "resumed_from_step": self.state["step"], "time": time.time()})
        self.val_shard = ray.train.get_dataset_shard("val")
        self.train_batches = ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=self.tc.micro_batch_size, drop_last=True,
            local_shuffle_buffer_size=cfg.data.local_shuffle_buffer or None,
            local_shuffle_seed=self.tc.seed if cfg.data.local_shuffle_buffer else None)
        # The log window: reset at each logged step.
        self.window_t, self.window_tokens, self.micro, self.data_wait = time.perf_counter(), 0, 0, 0.0
        self.figure_sums: dict[str, torch.Tensor] = {}  # per logged figure, summed over the window
        self.start_t, self.start_step = time.perf_counter(), self.state["step"]  # the ETA's clock
        self.consumed = self.position  # the stream position past the last row trained on
        self.saved = self.state["step"]  # the step of the latest checkpoint
        self.stop_reason: str | None = None

    def _restore(self, checkpoint: ray.train.Checkpoint | None) -> None:
        """The engine, and the step, token count and data position a resume continues from."""
        from dlm_ray.io.checkpoint import load_training

        # The model is built once (partitioned at construction under ZeRO-3, init_from's weights read
        # into it); a resume restores its own weights.
        self.engine, startup = start_engine(self.cfg, device=self.device, resume=checkpoint is not None)
        if self.rank == 0:
            say(startup)
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak = peak_flops(device_name, self.tc)
        self.state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "position": DataPosition().to_list()}
        if checkpoint:
            with checkpoint.as_directory() as d:
                self.state = load_training(Path(d), self.engine, rank=self.rank)
        self.position = DataPosition(*self.state["position"])
        if checkpoint and self.rank == 0:
            say(f"[train] resumed at step {self.state['step']}, data position {self.position}")

    # ---------------------------------------------------------------------------------- the loop

    def train(self) -> str:
        """Step until a stop reason, checkpoint the stop, and return the reason."""
        batches = self._new_batches()
        while self.should_continue():
            pair = next(batches, None)
            if pair is None:
                self.stop_reason = "data_exhausted"
                break
            if self.step(*pair):
                self._after_step()
        self._finish()
        return self.stop_reason or "max_steps"

    def should_continue(self) -> bool:
        """False once a stop reason is set; reaching ``max_steps`` sets one."""
        if self.stop_reason is None and self.state["step"] >= self.tc.max_steps:
            self.stop_reason = "max_steps"
        return self.stop_reason is None

    def _new_batches(self) -> Iterator[tuple[DataPosition, dict[str, torch.Tensor]]]:
        """(stream position after the batch, batch) for each batch not trained on yet."""
        for waited, batch in _timed(self.train_batches):
            self.data_wait += waited
            after = DataPosition.after_rows({c: batch[c].numpy() for c in ("epoch", "item_index", "row_index")})
            if after <= self.position:
                continue  # an in-run restart replays the stream from where fit() started it
            yield after, batch

    def step(self, after: DataPosition, batch: dict[str, torch.Tensor]) -> bool:
        """One micro-batch: forward, backward, engine step. True when it completed an optimizer step."""
        self.consumed = max(self.consumed, after)
        b = with_complements(_to_device(batch, self.device))  # complementary pairs: both views, 2B rows
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr_at(self.state["step"], self.tc)
        out = self.loss_fn(self.scheduled_model(), b, self.cfg, self.mask_id)
        loss, figures = out if isinstance(out, tuple) else (out, {})
        self.engine.backward(loss)
        self.engine.step()
        self.micro += 1
        # Logged per maskable token (the bound's own unit): the objective divides by every real token,
        # and a conditional row's prompt is real but never masked. Host counts: no device sync.
        per_maskable = _per_maskable(batch)
        for name, value in {"loss": loss, **figures}.items():
            total = value.detach().float() * per_maskable
            self.figure_sums[name] = self.figure_sums[name] + total if name in self.figure_sums else total
        self.window_tokens += int(batch["attention_mask"].sum()) * self.world  # the host copy: no device sync
        if self.micro % self.tc.grad_accum:
            return False
        self.state["step"] += 1
        self.state["tokens_seen"] += self.tc.batch_size * self.cfg.data.seq_len
        return True

    def scheduled_model(self) -> Any:
        """The engine, or while an adaptation's schedule runs (``dlm_ray.core.adapt``) a call of it
        with this step's attention: the annealed mask, or the warm-up's block size."""
        extra = training_attention(self.cfg.model, self.cfg.adapt, self.state["step"], seq_len=self.cfg.data.seq_len,
                                   seed=self.tc.seed, device=self.device)
        return functools.partial(self.engine, **extra) if extra else self.engine

    def _after_step(self) -> None:
        """What follows an optimizer step: its record (log window, evaluation), then a checkpoint or
        a plain report, then the fault drill."""
        step, tc = self.state["step"], self.tc
        last = step == tc.max_steps
        record = self.log_window() if step % tc.log_every == 0 or last else {}
        if (step % tc.eval_every == 0 or last) and not self.cfg.eval.on_checkpoints:
            record = {**record, "step": step, "val_nelbo_bits": self.evaluate()}
        if step == self.start_step + 1:  # the ETA's clock starts after the first step: start-up is not a step's cost
            self.start_t = time.perf_counter()
        if record and self.log is not None:
            self.log.log(record)
            done = step - self.start_step - 1
            per_step = (time.perf_counter() - self.start_t) / done if done > 0 else None
            say(console_line(record, max_steps=tc.max_steps, seconds_per_step=per_step))
        if step % tc.checkpoint_every == 0 or last:
            if last:
                record["stop_reason"] = "max_steps"
            self.checkpoint(record)
        # A record without a checkpoint goes to metrics.jsonl only, not to ray.train.report: each
        # report waits its turn in a one-slot queue the controller drains at its poll (seconds per
        # report), and behind a checkpoint still uploading, which would put storage back on the path.
        if tc.fail_once_at_step == step:
            _fail_once(self.cfg, self.rank)

    def _finish(self) -> None:
        """The stream ended before ``max_steps``: say so, and checkpoint the last step (with its
        evaluation) unless it already is."""
        if self.stop_reason == "data_exhausted":
            step = self.state["step"]
            _data_ran_out(step, self.start_step, self.tc, self.rank)
            record: dict[str, Any] = {"step": step, "stop_reason": "data_exhausted"}
            if step not in (self.saved, 0):
                if not self.cfg.eval.on_checkpoints:
                    record["val_nelbo_bits"] = self.evaluate()
                if self.log is not None:
                    self.log.log(record)
                self.checkpoint(record)
            else:
                ray.train.report(record)
        if self.log is not None:
            self.log.close()

    # ------------------------------------------------------------------------------ named steps

    def log_window(self) -> dict[str, Any]:
        """The record of the log window ending at this step (loss, lr, grad norm, throughput, MFU,
        data wait); the window starts again."""
        step, tc = self.state["step"], self.tc
        dt = time.perf_counter() - self.window_t
        tps = self.window_tokens / dt
        means = {name: float(total) / max(1, self.micro) for name, total in self.figure_sums.items()}
        record = {"step": step, "loss": means.pop("loss", 0.0), **means, "lr": lr_at(step - 1, tc),
                  "grad_norm": float(self.engine.get_global_grad_norm() or 0.0), "tokens_per_s": tps,
                  "mfu": tps * self.flops_per_token / (self.peak * self.world) if self.peak else None,
                  "tokens_seen": self.state["tokens_seen"], "epoch": self.consumed.epoch,
                  "data_wait_frac": self.data_wait / dt, "time": time.time()}
        self.window_t, self.window_tokens, self.micro, self.data_wait = time.perf_counter(), 0, 0, 0.0
        self.figure_sums = {}
        return record

    @torch.no_grad()  # a bound's samples must not keep their graphs: they add up to gigabytes per rank
    def evaluate(self) -> float | None:
        """Held-out NELBO in bits/token, averaged over ranks (each sees its own val rows, every one of
        them up to ``eval_batches`` micro-batches: a last short batch counts too); None when no rank
        had a held-out row, so no figure is made up."""
        model = self.engine.module
        model.eval()
        batches = self.val_shard.iter_torch_batches(batch_size=self.tc.micro_batch_size, drop_last=False)
        total = nelbo_totals(model, batches, mask_id=self.mask_id, num_samples=self.cfg.eval.nelbo_samples,
                             max_batches=self.tc.eval_batches, seed=self.tc.seed, device=self.device)
        torch.distributed.all_reduce(total)
        model.train()
        return float(nats_to_bits(total[0] / total[1])) if total[1] > 0 else None

    def checkpoint(self, record: dict[str, Any]) -> None:
        """A checkpoint of this step, reported with the step's record; every rank takes part. Each rank
        stages its part locally and Ray Train uploads it (in the background unless
        ``checkpoint_upload: sync``; ``dlm_ray.train.upload``); with ``eval.on_checkpoints`` the
        checkpoint is evaluated by a task of its own once committed (``dlm_ray.eval.checkpoints``); rank 0
        adds the evaluations finished so far to the log first."""
        from ray.train import CheckpointUploadMode

        from dlm_ray.io.checkpoint import save_training

        step = self.state["step"]
        self.state["position"] = _global_position(self.consumed, self.device).to_list()
        if self.log is not None:
            if self.cfg.eval.on_checkpoints:
                for finished in unjoined(run_dir(self.cfg), self.log.records, up_to=step):
                    self.log.log(finished)
            self.log.flush()
        staged = staging_dir(self.cfg, self.rank)
        save_training(staged, self.engine, rank=self.rank, state=self.state, cfg=self.cfg)
        mode = CheckpointUploadMode.ASYNC if self.tc.checkpoint_upload == "async" else CheckpointUploadMode.SYNC
        ray.train.report({**record, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(staged)),
                         checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True,
                         checkpoint_upload_fn=upload_fn(self.cfg, step=step, rank=self.rank),
                         validation=self.cfg.eval.on_checkpoints)
        self.saved = step


# -------------------------------------------------------------------------------------- helpers


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


def _data_ran_out(step: int, start_step: int, tc: TrainConfig, rank: int) -> None:
    """Training stops before ``max_steps`` when the stream ends: a line that says why, or an error
    when not one step could be taken (nothing to checkpoint or export)."""
    if step == start_step == 0:
        raise RuntimeError("the training data gave no micro-batch: the corpus is empty, or smaller than one "
                           f"micro-batch of {tc.micro_batch_size} rows per worker")
    if rank == 0:
        say(f"[train] stopped at step {step} of {tc.max_steps}: the data ran out after train.max_epochs="
             f"{tc.max_epochs} epochs (raise it, or lower train.max_steps)")


def _per_maskable(batch: dict[str, torch.Tensor]) -> float:
    """Real tokens over maskable ones in a pretraining batch (1 for fine-tuning and autoregressive rows)."""
    if "num_maskable" not in batch or "answer_len" in batch:
        return 1.0
    return float(batch["attention_mask"].sum()) / max(1, int(batch["num_maskable"].sum()))


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
    marker = f".fault_injected_rank{rank}"
    if not run_marker(run_dir(cfg), marker):
        run_marker(run_dir(cfg), marker, mark=True)
        raise InjectedFault(f"injected fault after step {cfg.train.fail_once_at_step} (rank {rank})")
