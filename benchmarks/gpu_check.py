"""The GPU check: training and sampling throughput and memory on one device, one table and a JSON.

    python benchmarks/gpu_check.py                 # one GPU, under 8 minutes on an H100
    python benchmarks/gpu_check.py --smoke         # the tiny preset on CPU, seconds (run by the tests)

Needs torch and DeepSpeed only (no Ray, no datasets): copy the repository and a DeepSpeed wheel to
a bare GPU machine and run it. It measures

- training: the ``1b`` preset, sequence 2,048, bf16, DeepSpeed ZeRO-2 on one device, the largest
  micro-batch that fits (powers of two), activation checkpointing off and on: tokens/s, MFU, peak
  memory, host-device syncs per step; the same step in plain PyTorch (fused AdamW, bf16 autocast)
  beside it: DeepSpeed's cost;
- sampling: the ``1b`` preset (random weights), 256 tokens in blocks of 32, batch 1 and 64: the
  reference sampler and the dual cache at the same commit count (4 tokens per call, so both do the
  same work per call), and threshold 0.9 with the dual cache; then the autoregressive line: the
  same 256 tokens one per call against a key/value cache of the canvas;
- sampling at Qwen2.5-0.5B's shape (random weights: 24 layers, 14 query heads on 2 key/value heads,
  q/k/v biases, tied embeddings, vocabulary 151,936), the shape diffusion models are adapted from:
  its diffusion form (full attention, shifted head) with the same samplers, and its autoregressive
  form through ``generate``'s own KV-cache decoder;
- block diffusion (blocks of 32, its exact cache, 4 tokens per call) and the autoregressive
  sampler (``generate``'s KV-cache decoder) on the ``1b`` shape, batch 1 and 64: each kind's
  per-call cost at fixed commits per call; every sampling row gives the share of its time spent
  outside the model's forward passes (``benchmarks/sampler_step.py``'s timer);
- the ``8b`` preset: parameters, and DeepSpeed's per-GPU memory estimate for ZeRO-3 on 8 GPUs.

Figures are printed, never asserted; the JSON (``--out``) holds every number.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, uninstalled

from dlm_ray.config.schema import ModelConfig, SampleConfig, TrainConfig  # noqa: E402
from dlm_ray.core.diffusion import diffusion_loss  # noqa: E402
from dlm_ray.train.engine import check_memory, checkpointed_blocks, deepspeed_config, make_optimizer, peak_flops  # noqa: E402
from dlm_ray.core.model import Denoiser, flops_per_token, num_params  # noqa: E402
from dlm_ray.core.sampling import generate  # noqa: E402
from sampler_step import ForwardTimer  # noqa: E402  (benchmarks/, this script's own directory)

MASK = 3  # any id works for random weights; 3 keeps clear of the ids the batches draw from


# Qwen2.5-0.5B's published config; the smoke run keeps its head layout (14 on 2, tied, biases) only.
QWEN_0_5B = dict(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64, d_mlp=4864,
                 max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True)
QWEN_SMOKE = dict(QWEN_0_5B, vocab_size=264, d_model=56, n_layers=2, head_dim=4, d_mlp=112, max_seq_len=256)


def sizes(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"preset": "tiny", "seq": 64, "micro": {"none": [1, 2], "full": [2, 4]}, "steps": 2, "gen": 32,
                "block": 8, "batches": [1, 4], "prompt": 16, "qwen": QWEN_SMOKE}
    # Micro-batches tried (ascending, until one runs out of memory): with checkpointing, larger ones fit.
    return {"preset": "1b", "seq": 2048, "micro": {"none": [2, 4, 8, 16], "full": [8, 16, 32, 64]}, "steps": 5,
            "gen": 256, "block": 32, "batches": [1, 64], "prompt": 64, "qwen": QWEN_0_5B}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def batch(cfg: ModelConfig, micro: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A masked training batch of random tokens (t ~ U(0, 1) per row)."""
    x0 = torch.randint(10, cfg.vocab_size, (micro, seq), device=device)
    p = torch.rand(micro, device=device).clamp_min(1e-3)
    masked = torch.rand(micro, seq, device=device) < p[:, None]
    return {"x0": x0, "xt": x0.masked_fill(masked, MASK), "masked": masked, "p": p}


def timed_steps(step: Callable[[dict[str, torch.Tensor]], None], b: dict[str, torch.Tensor], n: int,
                device: torch.device) -> float:
    """Seconds per step over ``n`` steps after two warm-up steps."""
    for _ in range(2):
        step(b)
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        step(b)
    sync(device)
    return (time.perf_counter() - t) / n


def train_case(cfg: ModelConfig, tc: TrainConfig, micro: int, seq: int, steps: int, device: torch.device,
               engine_kind: str) -> dict[str, Any]:
    """One configuration: DeepSpeed ZeRO-2 (bf16 on GPU) or plain PyTorch (fused AdamW, autocast)."""
    import deepspeed

    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model's CPU init alone takes seconds
        model = Denoiser(cfg)
    model.checkpointed = checkpointed_blocks(tc, cfg.n_layers)
    on_gpu = device.type == "cuda"
    if engine_kind == "deepspeed":
        tc = tc.model_copy(update={"micro_batch_size": micro, "batch_size": micro, "grad_accum": 1})
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               optimizer=make_optimizer(model.parameters(), tc, use_gpu=on_gpu),
                                               config=deepspeed_config(tc, use_gpu=on_gpu))

        def step(b: dict[str, torch.Tensor]) -> None:
            loss = diffusion_loss(engine(b["xt"]), b["x0"], b["masked"], b["p"], b["x0"].numel(), mask_id=MASK)
            engine.backward(loss)
            engine.step()
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu)

        def step(b: dict[str, torch.Tensor]) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                logits = model(b["xt"])
            loss = diffusion_loss(logits, b["x0"], b["masked"], b["p"], b["x0"].numel(), mask_id=MASK)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    reset_peak(device)
    b = batch(cfg, micro, seq, device)
    seconds = timed_steps(step, b, steps, device)
    tps = micro * seq / seconds
    peak = peak_flops(torch.cuda.get_device_name(device) if on_gpu else "cpu", tc)
    return {"engine": engine_kind, "micro_batch": micro, "activation_checkpointing": tc.activation_checkpointing,
            "s_per_step": seconds, "tokens_per_s": tps, "mfu": tps * flops_per_token(cfg, seq) / peak if peak else None,
            "peak_gib": peak_gib(device), "host_syncs_per_step": host_syncs(step, b, device)}


def host_syncs(step: Callable[[dict[str, torch.Tensor]], None], b: dict[str, torch.Tensor],
               device: torch.device) -> int | None:
    """Host-device synchronisations in one training step, counted by CUDA's sync debug mode (each
    one stalls the CPU until the GPU catches up); None on a CPU."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(b)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def largest_fitting(run: Callable[[int], dict[str, Any]], candidates: list[int], device: torch.device
                    ) -> dict[str, Any] | None:
    """The run at the largest micro-batch (of ``candidates``, ascending) that does not run out of memory."""
    best = None
    for micro in candidates:
        try:
            best = run(micro)
        except torch.OutOfMemoryError:
            break
        finally:
            gc.collect()  # the engine of the last try, before the next one allocates
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return best


def training(s: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    cfg = ModelConfig(preset=s["preset"])
    rows = []
    for ac in ("none", "full"):
        tc = TrainConfig(zero_stage=2, num_workers=1, activation_checkpointing=ac)

        def run(micro: int, tc: TrainConfig = tc) -> dict[str, Any]:
            return train_case(cfg, tc, micro, s["seq"], s["steps"], device, "deepspeed")

        ds = largest_fitting(run, s["micro"][ac], device)
        if ds is None:
            rows.append({"engine": "deepspeed", "activation_checkpointing": ac, "error": "micro-batch 1 does not fit"})
            continue
        rows.append(ds)
        plain = train_case(cfg, tc, ds["micro_batch"], s["seq"], s["steps"], device, "plain")
        plain["deepspeed_overhead"] = ds["s_per_step"] / plain["s_per_step"] - 1
        rows.append(plain)
    return rows


def sampling(s: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    rows = diffusion_sampling(s, device, ModelConfig(preset=s["preset"]), s["preset"], stand_in_ar=True)
    rows += kind_sampling(s, device, ModelConfig(preset=s["preset"]), s["preset"])
    qwen = ModelConfig(**s["qwen"], shift_logits=True)
    rows += diffusion_sampling(s, device, qwen, "qwen2.5-0.5b shape", stand_in_ar=False)
    ar = Denoiser(qwen.model_copy(update={"shift_logits": False, "attention": "causal"}))
    ar = ar.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    for bsz in s["batches"]:
        prompt = torch.randint(10, 200, (bsz, s["prompt"]), device=device)
        rows.append(timed_generate(ar, prompt, SampleConfig(gen_length=s["gen"], steps=s["gen"], block_length=s["gen"]),
                                   "autoregressive (generate, KV cache)", "qwen2.5-0.5b shape", device))
    return rows


def timed_generate(model: Denoiser, prompt: torch.Tensor, sc: SampleConfig, name: str, label: str,
                   device: torch.device) -> dict[str, Any]:
    generate(model, prompt, sc, mask_id=MASK)  # warm-up
    reset_peak(device)
    stats: dict[str, int] = {}
    timer = ForwardTimer(model, lambda: sync(device))  # the share of the time outside the model's passes
    sync(device)
    t = time.perf_counter()
    generate(model, prompt, sc, mask_id=MASK, stats=stats)
    sync(device)
    seconds = time.perf_counter() - t
    timer.remove(model)
    B = prompt.shape[0]
    return {"model": label, "sampler": name, "batch": B, "tokens_per_s": B * sc.gen_length / seconds,
            "model_calls": stats["model_calls"], "seconds": seconds, "peak_gib": peak_gib(device),
            "outside_model": 1 - timer.seconds / seconds}


def kind_sampling(s: dict[str, Any], device: torch.device, cfg: ModelConfig, label: str) -> list[dict[str, Any]]:
    """Block diffusion against its exact cache at the same 4 tokens per call, and the
    autoregressive sampler (``generate``'s own KV-cache decoder) on the same shape: the per-call
    cost of each kind with the commits per call fixed (random weights never stop early)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen, block = s["gen"], s["block"]
    rows = []
    for attention, name, sc in (
            ("block_causal", "block diffusion (exact cache, 4 tokens/call)",
             SampleConfig(gen_length=gen, steps=gen // 4, block_length=block, cache="blocks")),
            ("causal", "autoregressive (generate, KV cache)", SampleConfig(gen_length=gen, steps=gen, block_length=gen))):
        torch.manual_seed(0)
        with torch.device(device):
            model = Denoiser(cfg.model_copy(update={"attention": attention, "block_size": block})).to(dtype).eval()
        for bsz in s["batches"]:
            prompt = torch.randint(10, 200, (bsz, s["prompt"]), device=device)
            rows.append(timed_generate(model, prompt, sc, name, label, device))
        del model
        gc.collect()
    return rows


def diffusion_sampling(s: dict[str, Any], device: torch.device, cfg: ModelConfig, label: str, *,
                       stand_in_ar: bool) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = Denoiser(cfg).to(dtype).eval()
    gen, block = s["gen"], s["block"]
    calls = gen // 4  # 4 tokens committed per call
    settings = {"reference": SampleConfig(gen_length=gen, steps=calls, block_length=block),
                "dual cache": SampleConfig(gen_length=gen, steps=calls, block_length=block, cache="dual"),
                "threshold 0.9 + dual": SampleConfig(gen_length=gen, steps=gen, block_length=block, cache="dual",
                                                     threshold=0.9)}
    rows = []
    for bsz in s["batches"]:
        prompt = torch.randint(10, 200, (bsz, s["prompt"]), device=device)
        for name, sc in settings.items():
            rows.append(timed_generate(model, prompt, sc, name, label, device))
        if stand_in_ar:
            rows.append({"model": label, **autoregressive(model, prompt, gen, device)})
    return rows


@torch.inference_mode()
def autoregressive(model: Denoiser, prompt: torch.Tensor, gen: int, device: torch.device) -> dict[str, Any]:
    """The cost of decoding ``gen`` tokens one per call with a key/value cache: a prefill, then one
    token's forward per call against the cached canvas (greedy)."""
    B, P = prompt.shape
    canvas = torch.cat([prompt, torch.full((B, gen), MASK, device=device)], 1)
    reset_peak(device)
    sync(device)
    t = time.perf_counter()
    _, cache = model.prefill(canvas, logits_span=(P - 1, P))
    for i in range(gen):
        nxt = model.forward_window(canvas[:, P + i:P + i + 1], P + i, cache).argmax(-1)
        canvas[:, P + i] = nxt[:, 0]
    sync(device)
    seconds = time.perf_counter() - t
    return {"sampler": "autoregressive (1 token/call, KV cache)", "batch": B, "tokens_per_s": B * gen / seconds,
            "model_calls": gen + 1, "seconds": seconds, "peak_gib": peak_gib(device)}


def eight_b() -> dict[str, Any]:
    cfg = ModelConfig(preset="8b")
    line = check_memory(cfg, TrainConfig(zero_stage=3, num_workers=8), device_bytes=None)
    return {"params": num_params(cfg), "zero3_8gpu": line}


def init_single_process(device: torch.device) -> None:
    """DeepSpeed's process group of one, without a launcher."""
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed looks for an accelerator
    import deepspeed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny preset on CPU, seconds")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=["training", "sampling"])
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    s = sizes(args.smoke)
    t0 = time.time()
    init_single_process(device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "preset": s["preset"], "seq": s["seq"],
        "training": [] if "training" in args.skip else training(s, device),
        "sampling": [] if "sampling" in args.skip else sampling(s, device),
        "8b": eight_b(),
    }
    result["seconds"] = round(time.time() - t0, 1)
    print(f"\n{result['device']}, torch {result['torch']}, preset {s['preset']}, sequence {s['seq']}\n")
    print("| training | micro-batch | act. ckpt | tokens/s | MFU | peak GiB | host syncs/step | DeepSpeed overhead |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["training"]:
        print(f"| {r['engine']} | {fmt(r.get('micro_batch'))} | {r['activation_checkpointing']} | "
              f"{fmt(r.get('tokens_per_s'))} | {fmt(r.get('mfu'))} | {fmt(r.get('peak_gib'))} | "
              f"{fmt(r.get('host_syncs_per_step'))} | {fmt(r.get('deepspeed_overhead'))} |")
    print("\n| model | sampling | batch | tokens/s | model calls | seconds | peak GiB | outside the model |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["sampling"]:
        outside = f"{r['outside_model']:.0%}" if r.get("outside_model") is not None else "-"
        print(f"| {r['model']} | {r['sampler']} | {r['batch']} | {fmt(r['tokens_per_s'])} | {r['model_calls']} | "
              f"{fmt(r['seconds'])} | {fmt(r['peak_gib'])} | {outside} |")
    print(f"\n8b preset: {result['8b']['params'] / 1e9:.2f}B parameters; {result['8b']['zero3_8gpu']}")
    print(f"done in {result['seconds']} s; {args.out}")
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
