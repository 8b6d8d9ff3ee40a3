"""Tokenize and pack a corpus once, to Parquet shards that training reads directly.

    python jobs/prepare_data.py --output data/prepared [--config jobs/configs/tiny.yaml]
        [--data.source='s3://bucket/corpus/*.jsonl.gz'] [--overwrite]

Writes ``<output>/train/*.parquet``, ``<output>/val/*.parquet`` and ``<output>/manifest.json``
(tokenizer, seq_len, documents read, skipped by reason, tokens and rows written). Train on it with
``python jobs/pretrain.py --data.source=<output>``.
"""

from __future__ import annotations

import argparse
import json

import ray

from dlm_ray.config import PretrainConfig, load_config
from dlm_ray.data import init_ray, prepare


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    ap.add_argument("--output", required=True)
    ap.add_argument("--overwrite", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(PretrainConfig, args.config, overrides)
    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = True  # an offline job: show its progress
    manifest = prepare(cfg.data, cfg.tokenizer, args.output, overwrite=args.overwrite)
    print(json.dumps({"output": args.output, **manifest["splits"]}))
    return manifest


if __name__ == "__main__":
    main()
