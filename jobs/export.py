"""Turn a training checkpoint (any ZeRO stage) into an inference checkpoint.

    python jobs/export.py runs/tiny/checkpoint_<...> exports/tiny

Writes ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json`` for HF tokenizers), the
format batch generation and Serve load.
"""

from __future__ import annotations

import argparse

from dlm_ray.checkpoint import export


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a checkpoint_* directory of a run")
    ap.add_argument("output", help="directory for the inference checkpoint")
    args = ap.parse_args(argv)
    out = export(args.checkpoint, args.output)
    print(f"exported {args.checkpoint} -> {out}")
    return str(out)


if __name__ == "__main__":
    main()
