"""Fine-tune a model on (prompt, response) examples with Ray Train + DeepSpeed (LLaDA's SFT).

    python jobs/sft.py                                        # jobs/configs/sft.yaml: from runs/tiny/export
    python jobs/sft.py --init_from=<export or LLaDA dir> --data.source=chats.jsonl
    ray job submit --working-dir . -- python jobs/sft.py --config jobs/configs/sft_8b.yaml

The prompt is never masked and the loss is normalised by each answer's length; answers are padded
with EOS, which the model learns as the end. Rerunning with the same ``run_name`` resumes. On the
built-in corpus it prints held-out validity per task family before and after.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dlm_ray.eval.checkpoints import evaluate_checkpoint
from dlm_ray.io.checkpoint import export, load_inference, run_dir
from dlm_ray.config.schema import PretrainConfig
from dlm_ray.config.io import parse_job_args
from dlm_ray.eval.scoring import score
from dlm_ray.train.metrics import write_summary
from dlm_ray.runtime import init_ray
from dlm_ray.train.fit import fit, with_init_from

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "sft.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    cfg, args = parse_job_args(PretrainConfig, argv, __doc__.splitlines()[0],
                               lambda ap: ap.add_argument("--export-dir", help="default: <run dir>/export"))
    if cfg.data.task != "sft" or not cfg.init_from:
        raise SystemExit("jobs/sft.py needs data.task: sft and init_from (a model to start from)")
    t0 = time.time()
    init_ray()
    cfg = with_init_from(cfg)
    tc = cfg.train
    print(f"[sft] from {cfg.init_from} | run {run_dir(cfg)} | {tc.max_steps} steps of {tc.batch_size} x "
          f"{cfg.data.seq_len} tokens | data {cfg.data.source}", flush=True)
    builtin = cfg.data.source == "builtin"
    families = cfg.data.corpus.families
    if builtin:
        model, tok, _ = load_inference(cfg.init_from)
        before = score(model, tok, families, cfg.eval, seq_len=cfg.data.seq_len)
    result = fit(cfg, evaluator=evaluate_checkpoint)
    export_dir = args.export_dir or (run_dir(cfg) + "/export")
    with result.checkpoint.as_directory() as ckpt:
        export(ckpt, export_dir)
    summary = {"steps": result.metrics.get("step"), "stop_reason": result.metrics.get("stop_reason"),
               "init_from": cfg.init_from, "export": str(export_dir)}
    if builtin:
        model, tok, _ = load_inference(export_dir)
        after = score(model, tok, families, cfg.eval, seq_len=cfg.data.seq_len)
        print(f"{'':8s} " + " ".join(f"{f:>10s}" for f in after["validity"]))
        for label, s in (("before", before), ("after", after)):
            print(f"{label:8s} " + " ".join(f"{v:10.0%}" for v in s["validity"].values()))
        summary.update(validity_before=before["validity"], validity_after=after["validity"])
    summary["wall_seconds"] = round(time.time() - t0, 1)
    summary = write_summary(run_dir(cfg), summary)
    print(f"[sft] done in {summary['wall_seconds']:.0f} s; export {export_dir}", flush=True)
    return summary


if __name__ == "__main__":
    main()
