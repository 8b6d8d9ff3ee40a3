"""Batch generation job vs a direct ``generate`` loop over the same prompts, in one run.

    python benchmarks/batch_generate.py [--checkpoint runs/tiny/export] [--prompts 1024] [--threads 1]

(a) one process: tokenize, batch, ``sampling.generate``, decode; no Ray, no Parquet; once in input
order and once with the job's batches (sorted by length within each group of rows an actor
receives); and two such loops in two processes on half the prompts each, the scaling bound for 2
actors on this machine.
(b) ``dlm_ray.serving.batch.run`` with 1 actor, then (c) with 2 actors, each actor holding ``--threads``
torch threads, as (a) does. Same checkpoint, prompts, batch size and sampler settings. The job's
time is wall-clock from the call to the summary, so it includes actor start-up, model loading and
writing Parquet. Prints prompts/s and generated tokens/s, the job's overhead against (a) and the
speed-up of 2 actors over 1, then an estimate for a large prompt count. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from dlm_ray.io.checkpoint import load_inference, save_inference
from dlm_ray.config.schema import CorpusConfig, ModelConfig, SampleConfig
from dlm_ray.config.inference import GenerateConfig
from dlm_ray.data.corpus import HELDOUT_SEED, take_examples
from dlm_ray.serving.batch import run
from dlm_ray.core.model import Denoiser
from dlm_ray.core.inference import complete_texts
from dlm_ray.runtime import init_ray


def direct_loop(checkpoint: str, prompts: list[str], sc: SampleConfig, batch_size: int, threads: int,
                window: int | None) -> float:
    """With ``window``, prompts are sorted by length within each run of ``window`` prompts: the
    job's actors do exactly that with each group of rows they receive."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok, _ = load_inference(checkpoint)
    if window:
        prompts = [p for i in range(0, len(prompts), window) for p in sorted(prompts[i:i + window], key=len)]
    outs = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]  # one generate() call each, in this order
        outs += complete_texts(model, tok, chunk, sc, list(range(i, i + len(chunk))), batch_size=len(chunk))
    assert len(outs) == len(prompts)
    return time.perf_counter() - t0


def _half(args: tuple) -> float:
    return direct_loop(*args)


def parallel_direct(checkpoint: str, prompts: list[str], sc: SampleConfig, batch_size: int, threads: int,
                    window: int) -> float:
    """Two independent processes, each the length-sorted loop on half the prompts: what 2 workers
    can reach on this machine with no coordination at all (the scaling bound for 2 actors)."""
    import multiprocessing as mp

    halves = [prompts[::2], prompts[1::2]]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_half, [(checkpoint, h, sc, batch_size, threads, window) for h in halves])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="an exported checkpoint; default: a random tiny model")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--gen-length", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the loop and per actor")
    ap.add_argument("--estimate", type=int, default=1_000_000, help="prompt count for the time estimate")
    args = ap.parse_args()
    sc = SampleConfig(gen_length=args.gen_length, steps=args.gen_length, block_length=args.gen_length)
    tmp = Path(tempfile.mkdtemp(prefix="bench_gen_"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = str(save_inference(Denoiser(ModelConfig(preset="tiny")).eval(), {"kind": "byte"}, tmp / "ckpt"))
    prompts = [e.prompt for e in take_examples(CorpusConfig().families, args.prompts, seed=HELDOUT_SEED, split="heldout")]
    src = tmp / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

    window = args.batch_size * GenerateConfig().group_batches  # the rows one actor call receives
    direct_s = direct_loop(checkpoint, prompts, sc, args.batch_size, args.threads, window=None)
    sorted_s = direct_loop(checkpoint, prompts, sc, args.batch_size, args.threads, window=window)
    parallel_s = parallel_direct(checkpoint, prompts, sc, args.batch_size, args.threads, window // 2)
    init_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = {}
    # Warm-up: a new cluster's first job also pays for starting Ray's worker processes (importing
    # torch on 2 cores takes seconds), a one-off cost that a long job does not see per prompt.
    run(GenerateConfig(checkpoint=checkpoint, input="builtin:64", output=str(tmp / "warmup"), sample=sc,
                       batch_size=args.batch_size, actors=(2, 2), cpus_per_actor=1, torch_threads=args.threads,
                       progress_bars=False))
    for actors in (1, 2):
        cfg = GenerateConfig(checkpoint=checkpoint, input=str(src), output=str(tmp / f"out{actors}"), sample=sc,
                             batch_size=args.batch_size, actors=(actors, actors), cpus_per_actor=1,
                             torch_threads=args.threads, progress_bars=False)
        summary = run(cfg)
        assert summary["rows"] == args.prompts and summary["duplicate_ids"] == 0
        results[actors] = summary["seconds"]
    ray.shutdown()
    # This machine's speed drifts by up to ~20% over minutes: time that loop again after the
    # jobs and compare them with the mean of the two.
    sorted_again = direct_loop(checkpoint, prompts, sc, args.batch_size, args.threads, window=window)
    print(f"loop with the job's batches, before / after the jobs: {sorted_s:.1f} s / {sorted_again:.1f} s")
    sorted_s = (sorted_s + sorted_again) / 2

    tokens = args.prompts * args.gen_length
    print(f"\n{args.prompts} prompts, gen_length {args.gen_length}, {args.gen_length} steps, batch {args.batch_size}, "
          f"{args.threads} torch thread(s) per worker, {os.cpu_count()} cores\n")
    print("| path | seconds | prompts/s | canvas tokens/s | vs direct |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| direct generate() loop, 1 process | {direct_s:.1f} | {args.prompts / direct_s:.1f} | "
          f"{tokens / direct_s:.0f} | 1.00x |")
    print(f"| direct loop, the job's batches (mean) | {sorted_s:.1f} | {args.prompts / sorted_s:.1f} | "
          f"{tokens / sorted_s:.0f} | {sorted_s / direct_s:.2f}x time |")
    print(f"| 2 direct loops in 2 processes | {parallel_s:.1f} | {args.prompts / parallel_s:.1f} | "
          f"{tokens / parallel_s:.0f} | {parallel_s / direct_s:.2f}x time |")
    for actors, s in results.items():
        print(f"| job, {actors} actor{'s' if actors > 1 else ''} | {s:.1f} | {args.prompts / s:.1f} | "
              f"{tokens / s:.0f} | {s / direct_s:.2f}x time |")
    print(f"\njob at 1 actor vs direct loop: {results[1] / direct_s - 1:+.1%} time; vs the loop with the job's batches: "
          f"{results[1] / sorted_s - 1:+.1%}; 2 actors vs 1: {results[1] / results[2]:.2f}x "
          f"(2 processes vs 1 loop, the machine's bound: {sorted_s / parallel_s:.2f}x)")
    rate = args.prompts / results[2]
    print(f"estimate: {args.estimate:,} prompts at {rate:.1f} prompts/s on 2 actors ≈ "
          f"{args.estimate / rate / 3600:.1f} h; on N such actors ≈ {args.estimate / (rate / 2) / 3600:.1f} h / N")


if __name__ == "__main__":
    main()
