"""Logits for the current block only, against the whole canvas's: memory and speed of the sampler
at LLaDA's vocabulary (126,464) on a CPU-sized model and canvas.

    python benchmarks/block_logits.py [--batch 8] [--gen 256] [--block 32]

Each path runs in a fresh process: peak resident memory above the memory before sampling, and
generated tokens/s. "whole canvas" is the path before block-only logits: every model call
computes [B, P + gen, V] float32 logits and the sampler reads the block's. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from dlm_ray.config.schema import ModelConfig, SampleConfig
from dlm_ray.core.model import Denoiser
from dlm_ray.core.sampling import generate

VOCAB = 126_464  # LLaDA-8B's
MASK = 126_336


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(path: str, batch: int, gen: int, block: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = Denoiser(ModelConfig(vocab_size=VOCAB, d_model=256, n_layers=2, n_heads=4, d_mlp=512,
                                 max_seq_len=1024)).eval()
    run = model
    if path == "whole canvas":
        def run(x, am=None):  # no logits_span: the sampler cuts the block out of the whole canvas
            return model(x, am)
        run.max_seq_len = model.max_seq_len
    prompt = torch.randint(0, 1000, (batch, 32))
    cfg = SampleConfig(gen_length=gen, steps=gen // 4, block_length=block)
    before = rss_mb()
    t = time.perf_counter()
    generate(run, prompt, cfg, mask_id=MASK)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "tokens_per_s": batch * gen / seconds, "peak_above_mb": peak - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.gen, args.block)))
        return
    canvas = 32 + args.gen
    whole, one = (args.batch * n * VOCAB * 4 / 2**20 for n in (canvas, args.block))
    print(f"\nvocab {VOCAB:,}, batch {args.batch}, canvas {canvas} (prompt 32 + {args.gen}), blocks of "
          f"{args.block}, {args.gen // 4} model calls; float32 logits per call: whole canvas {whole:,.0f} MB, "
          f"one block {one:,.0f} MB\n")
    print("| logits for | tokens/s | seconds | peak RSS above start (MB) |")
    print("| --- | --- | --- | --- |")
    for path in ("whole canvas", "current block"):
        out = subprocess.run([sys.executable, __file__, "--child", path, "--batch", str(args.batch), "--gen",
                              str(args.gen), "--block", str(args.block)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {path} | {r['tokens_per_s']:,.1f} | {r['seconds']:.1f} | {r['peak_above_mb']:,.0f} |")


if __name__ == "__main__":
    main()
