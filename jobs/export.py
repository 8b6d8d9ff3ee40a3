"""Turn a training checkpoint (any ZeRO stage) into an inference checkpoint.

    python jobs/export.py runs/tiny/checkpoint_<...> exports/tiny

Writes the model family's Hugging Face layout (config.json, safetensors, the tokenizer files): LLaDA's
for a LLaDA-shaped diffusion model, Llama's or Qwen's for an autoregressive one (transformers loads it
as it is), Dream's or A2D's for other diffusion models; batch generation, Serve and evaluation load any.

    python jobs/export.py runs/tiny/checkpoint_<...> exports/tiny --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch

from dlm_ray.io.checkpoint import export


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a checkpoint_* directory of a run")
    ap.add_argument("output", help="directory for the inference checkpoint")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the written weights (LLaDA's own are bfloat16)")
    return ap


def main(argv: list[str] | None = None) -> str:
    args = parser().parse_args(argv)
    out = export(args.checkpoint, args.output, dtype=getattr(torch, args.dtype))
    print(f"exported {args.checkpoint} -> {out}")
    return str(out)


if __name__ == "__main__":
    main()
