"""Time per training step: plain PyTorch vs the DeepSpeed engine vs the full Ray Train path.

    python benchmarks/train_step.py [--preset tiny] [--batch 64] [--seq-len 64] [--steps 60]

Same model, batch and optimizer settings in one run: (a) a plain single-process AdamW loop,
(b) the DeepSpeed engine (ZeRO-1 and ZeRO-2, one process, gloo), (c) ``dlm_ray.train.fit.fit`` with one
Ray Train worker reading the Ray Data pipeline. Each gets the same number of CPU threads. Prints
seconds per step (median after warm-up) and ratios to (a). On a GPU machine, ``--device cuda``
times (a) and (b) in bf16 and prints tokens/s and MFU (``--peak-flops``, default H100 dense bf16).
The plain loop is timed again after the Ray run (timings drift on a shared machine); ratios are
against the mean of both. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import numpy as np
import torch

from dlm_ray.config.schema import DiffusionConfig, ModelConfig, PretrainConfig
from dlm_ray.config.io import load_config
from dlm_ray.core.diffusion import diffusion_loss, mask_rows
from dlm_ray.core.model import Denoiser, flops_per_token

MASK = 258


def batches(n: int, batch: int, seq_len: int, vocab: int, device: str):
    rng = np.random.default_rng(0)
    x0 = rng.integers(0, min(vocab, 256), (batch, seq_len))
    out = []
    for k in range(n):
        rows = {"input_ids": x0, "attention_mask": np.ones_like(x0), "epoch": np.full(batch, k),
                "row_id": np.arange(batch), "row_index": np.arange(batch)}
        b = mask_rows(rows, DiffusionConfig(), seed=0, mask_id=MASK, strata=batch)
        out.append({k: torch.as_tensor(v).to(device) for k, v in
                    {"x0": x0, "xt": b["noisy_ids"], "m": b["loss_mask"], "p": b["p_mask"]}.items()})
    return out


def loss_of(model, b) -> torch.Tensor:
    return diffusion_loss(model(b["xt"]), b["x0"], b["m"], b["p"], b["x0"].numel(), mask_id=MASK)


def time_steps(step_fn, data, device: str) -> float:
    times = []
    for b in data:
        t0 = time.perf_counter()
        step_fn(b)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[len(times) // 4:])


def plain(cfg: ModelConfig, data, device: str, dtype) -> float:
    torch.manual_seed(0)
    model = Denoiser(cfg).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01,
                            fused=device == "cuda")

    def step(b):
        loss = loss_of(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return time_steps(step, data, device)


def deepspeed_engine(cfg: PretrainConfig, data, device: str, stage: int) -> float:
    import deepspeed

    from dlm_ray.train.engine import deepspeed_config

    tc = cfg.train.model_copy(update={"zero_stage": stage, "num_workers": 1})
    torch.manual_seed(0)
    model = Denoiser(cfg.model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(tc, use_gpu=device == "cuda"))

    def step(b):
        loss = loss_of(engine, b)
        engine.backward(loss)
        engine.step()

    return time_steps(step, data, device)


def ray_train(cfg: PretrainConfig, threads: int) -> float:
    import ray

    from dlm_ray.runtime import init_ray
    from dlm_ray.train.fit import fit

    init_ray(num_cpus=threads + 2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        run = cfg.model_copy(update={"storage_path": tmp, "run_name": "bench"})
        result = fit(run)
    ray.shutdown()
    rates = [h["tokens_per_s"] for h in result.metrics["history"] if "tokens_per_s" in h][1:]
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    return tokens_per_step / statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peak-flops", type=float, default=989e12)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(PretrainConfig, None, [
        f"--model.preset={args.preset}", f"--data.seq_len={args.seq_len}", f"--train.batch_size={args.batch}",
        "--train.num_workers=1", f"--train.cpus_per_worker={args.threads}", f"--train.max_steps={args.steps}",
        "--train.log_every=10", f"--train.eval_every={10 * args.steps}", f"--train.checkpoint_every={10 * args.steps}",
        "--data.builtin_docs=60000", "--data.tokenizer_actors=[1, 1]"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    data = batches(args.steps, args.batch, args.seq_len, cfg.model.vocab_size, args.device)
    tokens = args.batch * args.seq_len
    rows = [("plain PyTorch AdamW", plain(cfg.model, data, args.device, dtype))]
    for stage in (1, 2):
        rows.append((f"DeepSpeed engine ZeRO-{stage}", deepspeed_engine(cfg, data, args.device, stage)))
    torch.distributed.destroy_process_group()
    base, base_note = rows[0][1], ""
    if not args.skip_ray and args.device == "cpu":
        rows.append(("Ray Train + Data + DeepSpeed ZeRO-2, 1 worker", ray_train(cfg, args.threads)))
        # Timings on a shared 2-core machine drift over minutes: time the baseline again after the
        # Ray run and compare everything against the mean of both.
        rows.append(("plain PyTorch AdamW, again", plain(cfg.model, data, args.device, dtype)))
        base, base_note = (rows[0][1] + rows[-1][1]) / 2, ", the mean of both plain runs"
    print(f"preset {args.preset}, batch {args.batch} x {args.seq_len} tokens, {args.threads} threads, {args.device}")
    print(f"{'path':<46} {'s/step':>8} {'tokens/s':>10} {'vs plain':>9} {'MFU':>7}")
    fpt = flops_per_token(cfg.model, args.seq_len)
    for name, t in rows:
        mfu = tokens / t * fpt / args.peak_flops if args.device == "cuda" else float("nan")
        print(f"{name:<46} {t:>8.4f} {tokens / t:>10.0f} {t / base:>8.2f}x {mfu:>7.1%}")
    print(f"'vs plain' is against {base:.4f} s/step{base_note}")


if __name__ == "__main__":
    main()
