"""Will a training config fit, and how long will it take? Prints the plan; starts nothing.

    python jobs/plan.py --config jobs/configs/8b.yaml --gpus 16 --gpu H100 [--mfu 0.4] [--train.zero_stage=2 ...]

Parameters, DeepSpeed's model-state estimate per GPU for the config's ZeRO stage, the activation
memory of the configured micro-batch with and without activation checkpointing, whether it fits,
the micro-batch that would, and tokens/s and days for ``train.max_steps`` at an MFU (measured by
``benchmarks/gpu_check.py`` and given with ``--mfu``, or else an assumption the output names).
"""

from __future__ import annotations

import argparse
import os

from pydantic import ValidationError

from dlm_ray.config.io import parse_job_args
from dlm_ray.config.schema import PretrainConfig
from dlm_ray.train.plan import GPUS, describe, make_plan


def _extra(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--gpus", type=int, default=None, help="GPUs in all (default: train.num_workers)")
    ap.add_argument("--gpu", default="H100", choices=sorted(GPUS))
    ap.add_argument("--gpus_per_node", type=int, default=8)
    ap.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation, 0-1 (default: an assumption)")


def main(argv: list[str] | None = None) -> str:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's estimators only: no device is looked for
    cfg, args = parse_job_args(PretrainConfig, argv, __doc__.splitlines()[0], extra=_extra)
    gpus = args.gpus or cfg.train.num_workers
    # The config's batch must divide over the planned GPUs as it would over that many workers.
    try:  # checked as training would check it on that many workers
        cfg = PretrainConfig.model_validate({**cfg.to_dict(), "train": {**cfg.train.to_dict(), "num_workers": gpus}})
    except ValidationError as exc:
        raise SystemExit(f"plan: on {gpus} GPUs: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    text = describe(make_plan(cfg, gpus=gpus, gpu=args.gpu, gpus_per_node=args.gpus_per_node, mfu=args.mfu), cfg)
    print(text)
    return text


if __name__ == "__main__":
    main()
