"""Batch generation: completions for every prompt, written to Parquet, each id exactly once.

    python jobs/generate.py [--config jobs/configs/generate.yaml] [--input=prompts/*.jsonl ...]
    ray job submit --working-dir . -- python jobs/generate.py --config jobs/configs/generate_gpu.yaml

Rerunning with the same output resumes: finished ids are skipped, the rest are generated. The
default generates for 1000 held-out prompts of the built-in corpus with the checkpoint that
``python jobs/pretrain.py`` exports, and prints the checker's validity rate with the summary.
"""

from __future__ import annotations

import json

from dlm_ray.config.inference import GenerateConfig
from dlm_ray.config.io import parse_job_args
from dlm_ray.runtime import init_ray
from dlm_ray.serving.batch import run


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_job_args(GenerateConfig, argv, __doc__.splitlines()[0])
    init_ray()
    summary = run(cfg)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
