"""Throughput of ``sampling.generate`` for the tiny model: tokens/s and model calls (NFE).

    python benchmarks/sampling.py [--threads 2]

Generated tokens only are counted (prompt tokens are not), per setting, batch included. Random
weights: speed does not depend on what the model learned. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

from dlm_ray.config.schema import ModelConfig, SampleConfig
from dlm_ray.core.model import Denoiser
from dlm_ray.core.sampling import generate
from dlm_ray.core.tokenizer import ByteTokenizer

SETTINGS = [  # (gen_length, steps, block_length, batch)
    (32, 32, 32, 1), (32, 8, 32, 1), (64, 64, 16, 1), (64, 16, 16, 1),
    (64, 64, 16, 16), (128, 128, 32, 8), (128, 32, 32, 8),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prompt-len", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = ByteTokenizer()
    model = Denoiser(ModelConfig(preset="tiny")).eval()
    print(f"tiny model, prompt length {args.prompt_len}, {args.threads} threads")
    print(f"{'gen_len':>7} {'steps':>5} {'block':>5} {'batch':>5} {'NFE':>4} {'tok/call':>8} {'seconds':>8} {'tokens/s':>9}")
    for gen_length, steps, block, batch in SETTINGS:
        cfg = SampleConfig(gen_length=gen_length, steps=steps, block_length=block)
        prompt = torch.randint(0, 256, (batch, args.prompt_len))
        calls: list[int] = []

        def counted(x, am=None, calls=calls):
            calls.append(1)
            return model(x, am)

        generate(counted, prompt, cfg, mask_id=tok.mask_id)  # warm-up
        calls.clear()
        t0 = time.perf_counter()
        generate(counted, prompt, cfg, mask_id=tok.mask_id)
        dt = time.perf_counter() - t0
        nfe = len(calls)
        print(f"{gen_length:>7} {steps:>5} {block:>5} {batch:>5} {nfe:>4} {gen_length / nfe:>8.1f} {dt:>8.3f} "
              f"{batch * gen_length / dt:>9.0f}")


if __name__ == "__main__":
    main()
