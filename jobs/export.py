"""Turn a training checkpoint (any ZeRO stage) into an inference checkpoint.

    python jobs/export.py runs/tiny/checkpoint_<...> exports/tiny

Writes LLaDA's Hugging Face layout (config.json, safetensors with LLaDA's tensor names, the
tokenizer files), the format batch generation, Serve and evaluation load.

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
