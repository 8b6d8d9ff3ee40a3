"""Load on the Serve app over localhost HTTP: batching on vs off, at concurrency 1, 8 and 32.

    python benchmarks/serve_load.py [--checkpoint runs/tiny/export] [--requests 96] [--threads 1]

A bounded load generator (asyncio + httpx): ``c`` clients each send requests back to back until
``--requests`` (at least 2c) have been answered. The same app is deployed twice, one after the
other on the same local Ray: with ``max_batch_size`` = ``--batch`` and with 1. Prints requests/s,
p50/p99 latency and the count of non-200 answers. First it times the same requests' sampling in
this process (no HTTP, no Serve) at batch ``--batch`` and at 1: the most batching can gain from
compute alone on this machine. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import ray
import torch
from ray import serve

from dlm_ray.io.checkpoint import inference_placement, load_inference, save_inference
from dlm_ray.config.schema import CorpusConfig, ModelConfig, SampleConfig
from dlm_ray.data.corpus import take_examples
from dlm_ray.core.model import Denoiser
from dlm_ray.core.inference import complete_ids
from dlm_ray.core.text import encode_prompt
from dlm_ray.serving.app import build_app

MAX_TOKENS = 24  # each request's max_tokens: one block of 24 tokens in 24 steps


def compute_bound(checkpoint: str, prompts: list[str], batch: int, threads: int, dtype: str) -> tuple[float, float]:
    """Seconds to sample ``prompts`` in this process at batch ``batch`` and at batch 1."""
    _, torch_dtype = inference_placement(False, dtype, threads)
    model, tok, _ = load_inference(checkpoint, dtype=torch_dtype)
    ids = [encode_prompt(tok, p) for p in prompts]
    sc = SampleConfig(gen_length=MAX_TOKENS, steps=MAX_TOKENS, block_length=MAX_TOKENS)
    times = []
    for b in (batch, 1):
        t = time.perf_counter()
        complete_ids(model, tok, ids, sc, list(range(len(ids))), batch_size=b)
        times.append(time.perf_counter() - t)
    return times[0], times[1]


async def load(url: str, model: str, prompts: list[str], concurrency: int, total: int) -> dict:
    latencies: list[float] = []
    codes: list[int] = []
    next_k = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_k
        while next_k < total:
            k = next_k
            next_k += 1
            body = {"model": model, "prompt": prompts[k % len(prompts)], "seed": k, "max_tokens": MAX_TOKENS}
            t = time.perf_counter()
            r = await http.post(f"{url}/v1/completions", json=body)
            latencies.append(time.perf_counter() - t)
            codes.append(r.status_code)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await http.post(f"{url}/v1/completions", json={"model": model, "prompt": prompts[0], "max_tokens": MAX_TOKENS})
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies)
    return {"rps": len(codes) / wall, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "errors": sum(c != 200 for c in codes), "n": len(codes)}


def batch_sizes(url: str, replicas: int = 1) -> dict[int, int]:
    """Batch sizes so far, summed over the replicas: ``/v1/stats`` answers from one replica at a time,
    so it is asked until ``replicas`` distinct ones have answered (or 200 tries)."""
    seen: dict[str, dict[int, int]] = {}
    for _ in range(200):
        body = httpx.get(f"{url}/v1/stats").json()
        seen[body["replica"]] = {int(k): v for k, v in body["batch_sizes"].items()}
        if len(seen) >= replicas:
            break
    total: dict[int, int] = {}
    for hist in seen.values():
        for k, v in hist.items():
            total[k] = total.get(k, 0) + v
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="an exported checkpoint; default: a random tiny model")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32, help="max_batch_size of the batched deployment")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the replica")
    ap.add_argument("--wait", type=float, default=0.05, help="batch_wait_timeout_s of the batched deployment")
    ap.add_argument("--dtype", default="auto", help="the replica's dtype (auto: float32 on CPU)")
    ap.add_argument("--replicas", type=int, default=1, help="replicas of each deployment (fixed, no autoscaling)")
    args = ap.parse_args()
    checkpoint = args.checkpoint
    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = str(save_inference(Denoiser(ModelConfig(preset="tiny")).eval(), {"kind": "byte"},
                                        Path(tempfile.mkdtemp(prefix="bench_serve_")) / "ckpt"))
    prompts = [e.prompt for e in take_examples(CorpusConfig().families, 64, seed=7, split="heldout")]
    bound = compute_bound(checkpoint, prompts[:args.batch] * 2, args.batch, args.threads, args.dtype)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    table = {}
    for batch in (args.batch, 1):
        serve.run(build_app({"checkpoint": checkpoint, "model_name": "bench", "max_batch_size": batch,
                             "batch_wait_timeout_s": args.wait if batch > 1 else 0.0, "torch_threads": args.threads,
                             "dtype": args.dtype,
                             "num_cpus": 1 / args.replicas,
                             "autoscaling": {"min_replicas": args.replicas, "max_replicas": args.replicas}}),
                  name="bench", route_prefix="/")
        for c in (1, 8, 32):
            before = batch_sizes(url, args.replicas)
            table[(batch, c)] = asyncio.run(load(url, "bench", prompts, c, max(args.requests, 2 * c)))
            after = batch_sizes(url, args.replicas)
            n = {k: after[k] - before.get(k, 0) for k in after}
            table[(batch, c)]["mean_batch"] = sum(k * v for k, v in n.items()) / max(1, sum(n.values()))
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()

    print(f"\ntiny model, {args.replicas} replica(s) ({args.threads} torch thread, dtype {args.dtype}), "
          f"max_tokens {MAX_TOKENS} in {MAX_TOKENS} steps, {args.requests}+ requests per cell\n")
    print("| max_batch_size | concurrency | req/s | p50 s | p99 s | non-200 | mean batch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (batch, c), r in table.items():
        print(f"| {batch} | {c} | {r['rps']:.1f} | {r['p50']:.3f} | {r['p99']:.3f} | {r['errors']} | "
              f"{r['mean_batch']:.1f} |")
    for c in (1, 8, 32):
        print(f"batching speed-up at concurrency {c}: {table[(args.batch, c)]['rps'] / table[(1, c)]['rps']:.2f}x")
    n = 2 * args.batch
    print(f"in-process sampling of {n} of these prompts, no HTTP: batch {args.batch} {bound[0]:.2f} s "
          f"({n / bound[0]:.1f}/s), batch 1 {bound[1]:.2f} s ({n / bound[1]:.1f}/s): at most {bound[1] / bound[0]:.2f}x "
          "from batching on this machine's compute")


if __name__ == "__main__":
    main()
