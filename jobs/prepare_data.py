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

from dlm_ray.config.schema import PretrainConfig
from dlm_ray.config.io import parse_job_args
from dlm_ray.data.pipeline import prepare
from dlm_ray.runtime import init_ray


def _job_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--output", help="directory for the prepared Parquet shards and manifest.json")
    ap.add_argument("--overwrite", action="store_true", help="replace an output prepared with other settings")


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_job_args(PretrainConfig, argv, __doc__.splitlines()[0], _job_args)
    if not args.output:
        raise SystemExit("prepare_data.py: --output DIR is required")
    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = True  # an offline job: show its progress
    manifest = prepare(cfg.data, cfg.tokenizer, args.output, overwrite=args.overwrite)
    print(json.dumps({"output": args.output, **manifest["splits"]}))
    return manifest


if __name__ == "__main__":
    main()
