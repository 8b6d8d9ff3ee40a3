"""Pretrain the denoiser with Ray Train + DeepSpeed, then export it and score it.

    python jobs/pretrain.py [--config jobs/configs/tiny.yaml] [--train.max_steps=300 ...]
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/small.yaml

Rerunning with the same ``run_name`` resumes from the run's latest checkpoint. On the built-in
corpus it prints held-out NELBO (bits/token) and the checker's validity per task family for the
trained model next to the untrained one, and a few decoded samples.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dlm_ray.checkpoint import export, load_inference
from dlm_ray.config import PretrainConfig, parse_job_args
from dlm_ray.data import init_ray
from dlm_ray.evaluate import score
from dlm_ray.model import Denoiser, num_params
from dlm_ray.tokenizer import load_tokenizer
from dlm_ray.train import fit, run_dir, write_summary


def report(label: str, s: dict) -> None:
    print(f"[{label}] held-out NELBO {s['nelbo_bits']:.3f} bits/token; validity "
          + ", ".join(f"{k} {v:.0%}" for k, v in s["validity"].items()), flush=True)


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_job_args(PretrainConfig, argv, __doc__.splitlines()[0],
                               lambda ap: ap.add_argument("--export-dir", help="default: <run dir>/export"))
    t0 = time.time()
    init_ray()
    print(f"model: {num_params(cfg.model) / 1e6:.2f}M params; run {run_dir(cfg)}", flush=True)
    builtin = cfg.data.source == "builtin"
    tok = load_tokenizer(cfg.tokenizer)
    torch.manual_seed(cfg.train.seed)  # the same initial weights the workers start from
    families = cfg.data.corpus.families
    before = score(Denoiser(cfg.model).eval(), tok, families, cfg.eval, seq_len=cfg.data.seq_len) if builtin else None

    t_train = time.time()
    result = fit(cfg)
    train_s = time.time() - t_train
    history = result.metrics.get("history", [])
    export_dir = Path(args.export_dir or (run_dir(cfg) + "/export"))
    with result.checkpoint.as_directory() as ckpt:
        export(ckpt, export_dir)
    summary = {"steps": result.metrics.get("step"), "train_seconds": round(train_s, 1),
               "checkpoint": result.checkpoint.path, "export": str(export_dir)}
    if builtin:
        model, tok, _ = load_inference(export_dir)
        after = score(model, tok, cfg.data.corpus.families, cfg.eval, seq_len=cfg.data.seq_len)
        report("untrained", before)
        report("trained", after)
        for fam, rows in after["samples"].items():
            for prompt, comp, ok in rows:
                print(f"  {fam:13s} {prompt!r:22s} -> {comp!r} {'ok' if ok else 'wrong'}")
        summary.update(nelbo_bits_before=before["nelbo_bits"], nelbo_bits_after=after["nelbo_bits"],
                       validity_before=before["validity"], validity_after=after["validity"])
    summary["wall_seconds"] = round(time.time() - t0, 1)
    summary = write_summary(cfg, history, summary)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
