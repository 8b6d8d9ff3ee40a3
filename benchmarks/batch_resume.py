"""A resumed batch-generation job against a fresh one: rows/s of each, on the same machine in one run.

    python benchmarks/batch_resume.py [--checkpoint runs/tiny/export] [--prompts 3000]

The fresh job generates for one file of ``--prompts`` held-out prompts. Then a second file of as many
new prompts joins the input and the same job is rerun over the same output: Ray Data's checkpoint
filter passes over the finished ids and only the new rows are generated, which is what a job
resumed after a kill does. Prints both rows/s and their ratio. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from dlm_ray.io.checkpoint import save_inference
from dlm_ray.config.schema import CorpusConfig, ModelConfig, SampleConfig
from dlm_ray.config.inference import GenerateConfig
from dlm_ray.data.corpus import HELDOUT_SEED, take_examples
from dlm_ray.serving.batch import run
from dlm_ray.core.model import Denoiser
from dlm_ray.runtime import init_ray


def write_prompts(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="an exported checkpoint; default: a random tiny model")
    ap.add_argument("--prompts", type=int, default=3000, help="prompts per run")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = str(save_inference(Denoiser(ModelConfig(preset="tiny")).eval(), {"kind": "byte"}, tmp / "ckpt"))
    prompts = [e.prompt for e in take_examples(CorpusConfig().families, 2 * args.prompts, seed=HELDOUT_SEED,
                                               split="heldout")]
    (tmp / "in").mkdir()
    write_prompts(tmp / "in" / "a.jsonl", prompts[:args.prompts])
    init_ray(include_dashboard=False)
    cfg = GenerateConfig(checkpoint=checkpoint, input=str(tmp / "in"), output=str(tmp / "out"),
                         sample=SampleConfig(gen_length=24, steps=24, block_length=24), progress_bars=False)
    fresh = run(cfg)
    write_prompts(tmp / "in" / "b.jsonl", prompts[args.prompts:])
    resumed = run(cfg)
    print(f"\n{args.prompts} prompts per run, actors {cfg.actors}, batch {cfg.batch_size}, checkpoint {checkpoint}\n")
    print("| run | rows generated | rows already done | seconds | rows/s |")
    print("| --- | --- | --- | --- | --- |")
    for name, s in (("fresh", fresh), ("resumed", resumed)):
        print(f"| {name} | {s['rows_this_run']} | {s['rows_done_before']} | {s['seconds']:.1f} | {s['prompts_per_s']:.1f} |")
    print(f"resumed / fresh rows/s: {resumed['prompts_per_s'] / fresh['prompts_per_s']:.2f}; "
          f"duplicate ids {resumed['duplicate_ids']}")


if __name__ == "__main__":
    main()
