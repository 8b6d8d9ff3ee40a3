"""Pretrain the denoiser with Ray Train + DeepSpeed, then export it and score it.

    python jobs/pretrain.py [--config jobs/configs/tiny.yaml] [--train.max_steps=300 ...]
    python jobs/pretrain.py --init_from=<autoregressive export> --model.attention=full   # adapt it
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/small.yaml

Rerunning with the same ``run_name`` resumes from the run's latest checkpoint. On the built-in
corpus it prints held-out NELBO (bits/token) and the checker's validity per task family for the
trained model next to the untrained one, and a few decoded samples.
"""

from __future__ import annotations

import time

import torch

from dlm_ray.eval.checkpoints import evaluate_checkpoint
from dlm_ray.io.checkpoint import export, load_inference, run_dir
from dlm_ray.config.schema import PretrainConfig
from dlm_ray.config.io import parse_job_args
from dlm_ray.train.engine import deepspeed_config, zero_stage
from dlm_ray.eval.scoring import score
from dlm_ray.train.metrics import write_summary
from dlm_ray.core.model import Denoiser, num_params
from dlm_ray.runtime import init_ray
from dlm_ray.core.tokenizer import load_tokenizer
from dlm_ray.train.fit import adaptation_line, fit, with_init_from


def results_table(before: dict, after: dict, first: str = "untrained") -> str:
    """Untrained vs trained: held-out NELBO and validity per task family, one row each."""
    cols = list(after["validity"])
    head = f"{'':10s} {'NELBO bits/token':>17s} " + " ".join(f"{c:>13s}" for c in cols)
    rows = [f"{label:10s} {s['nelbo_bits']:17.3f} " + " ".join(f"{s['validity'][c]:13.0%}" for c in cols)
            for label, s in ((first, before), ("trained", after))]
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_job_args(PretrainConfig, argv, __doc__.splitlines()[0],
                               lambda ap: ap.add_argument("--export-dir", help="default: <run dir>/export"))
    t0 = time.time()
    init_ray()
    cfg = with_init_from(cfg)  # the checkpoint's shape and tokenizer; an AR one adapts to a given diffusion kind
    tc = cfg.train
    where = f"{tc.gpus_per_worker:g} GPU" if tc.use_gpu else f"{tc.cpus_per_worker:g} CPU"
    stage = zero_stage(deepspeed_config(tc, use_gpu=tc.use_gpu))  # train.deepspeed_config may set it
    print(f"[pretrain] model {num_params(cfg.model) / 1e6:.2f}M params | run {run_dir(cfg)}\n"
          f"[pretrain] {tc.num_workers} workers x {where}, DeepSpeed ZeRO-{stage} | {tc.max_steps} steps of "
          f"{tc.batch_size} x {cfg.data.seq_len} tokens | data {cfg.data.source}", flush=True)
    if adaptation := adaptation_line(cfg):
        print(adaptation, flush=True)
    builtin = cfg.data.source == "builtin"
    tok = load_tokenizer(cfg.tokenizer)
    torch.manual_seed(tc.seed)  # the same initial weights the workers start from
    families = cfg.data.corpus.families
    start = load_inference(cfg.init_from)[0] if cfg.init_from else Denoiser(cfg.model).eval()
    before = score(start, tok, families, cfg.eval, seq_len=cfg.data.seq_len) if builtin else None

    t_train = time.time()
    result = fit(cfg, evaluator=evaluate_checkpoint)
    train_s = time.time() - t_train
    export_dir = args.export_dir or (run_dir(cfg) + "/export")
    with result.checkpoint.as_directory() as ckpt:
        export(ckpt, export_dir)
    summary = {"steps": result.metrics.get("step"), "stop_reason": result.metrics.get("stop_reason"),
               "train_seconds": round(train_s, 1),
               "checkpoint": result.checkpoint.path, "export": str(export_dir)}
    if builtin:
        model, tok, _ = load_inference(export_dir)
        after = score(model, tok, cfg.data.corpus.families, cfg.eval, seq_len=cfg.data.seq_len)
        print(results_table(before, after, "init_from" if cfg.init_from else "untrained"))
        for fam, rows in after["samples"].items():
            for prompt, comp, ok in rows:
                print(f"  {fam:13s} {prompt!r:22s} -> {comp!r} {'ok' if ok else 'wrong'}")
        summary.update(nelbo_bits_before=before["nelbo_bits"], nelbo_bits_after=after["nelbo_bits"],
                       validity_before=before["validity"], validity_after=after["validity"])
    summary["wall_seconds"] = round(time.time() - t0, 1)
    summary = write_summary(run_dir(cfg), summary)
    print(f"[pretrain] done in {summary['wall_seconds']:.0f} s ({summary['steps']} steps, stopped by "
          f"{summary['stop_reason']}); export {export_dir}; "
          f"summary {run_dir(cfg)}/summary.json", flush=True)
    return summary

if __name__ == "__main__":
    main()
