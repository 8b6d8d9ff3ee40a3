"""Evaluating one training checkpoint, as a Ray task of its own: Ray Train's validation hook.

With ``eval.on_checkpoints`` the trainers do not score the held-out set themselves: every checkpoint
is reported with ``validation=True``, and Ray Train runs ``evaluate_checkpoint`` on it once it is
committed, on ``eval.cpus`` / ``eval.gpus`` (resources the trainers do not hold). The task exports
the checkpoint and scores the export:

- ``val_nelbo_bits``: the held-out NELBO the training loop would have logged, over as many rows of
  the run's own held-out split, packed by the same pipeline (``train.eval_batches`` micro-batches
  per worker: the loop scores that many on each worker's shard);
- ``validity_<family>``: on the built-in corpus, the checker's rate over
  ``eval.checkpoint_prompts_per_family`` held-out prompts per family;
- ``lm_eval/<task>/<metric>``: lm-evaluation-harness tasks, if ``eval.lm_eval_tasks`` names any,
  scored as ``jobs/evaluate.py`` scores them.

It writes the record to the run directory (``dlm_ray.io.evaluations``) and returns its figures, which
Ray Train attaches to the checkpoint. The training job hands this function to ``fit``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dlm_ray.config.schema import PretrainConfig
from dlm_ray.core.diffusion import nats_to_bits
from dlm_ray.core.kinds import kind_of
from dlm_ray.core.likelihood import nelbo_totals
from dlm_ray.core.tokenizer import load_tokenizer
from dlm_ray.eval.scoring import validity
from dlm_ray.io.checkpoint import STATE_FILE, export, load_inference, run_dir
from dlm_ray.io.evaluations import write_evaluation


def evaluate_checkpoint(checkpoint: Any, *, cfg: dict[str, Any]) -> dict[str, Any]:
    """Score one committed checkpoint (a ``ray.train.Checkpoint``) of the run ``cfg``; write and
    return its record's figures."""
    from dlm_ray.data.pipeline import packed_dataset

    run = PretrainConfig.model_validate(cfg)
    t0 = time.time()
    device = torch.device("cuda" if run.eval.gpus > 0 and torch.cuda.is_available() else "cpu")
    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory(prefix="dlm-eval-") as out:
        step = json.loads((Path(d) / STATE_FILE).read_text())["step"]
        export(d, out)
        model, tok, _ = load_inference(out, device=device)
        val = packed_dataset(run.data, run.tokenizer, "val", block_size=kind_of(run.model).block_size)
        batches = val.iter_torch_batches(batch_size=run.train.micro_batch_size, drop_last=False)
        total = nelbo_totals(model, batches, mask_id=load_tokenizer(run.tokenizer).mask_id,
                             num_samples=run.eval.nelbo_samples,
                             max_batches=run.train.eval_batches * run.train.num_workers,
                             seed=run.train.seed, device=device)
        record: dict[str, Any] = {"step": step,
                                  "val_nelbo_bits": float(nats_to_bits(total[0] / total[1])) if total[1] > 0 else None}
        if run.data.source == "builtin" and run.eval.checkpoint_prompts_per_family:
            rates = validity(model, tok, sorted(run.data.corpus.families), run.eval.sample,
                             num_prompts=run.eval.checkpoint_prompts_per_family).rates
            record.update({f"validity_{family}": rate for family, rate in rates.items()})
        if run.eval.lm_eval_tasks:
            record.update(lm_eval_figures(out, run, device))
    record["eval_seconds"] = round(time.time() - t0, 2)
    write_evaluation(run_dir(run), record)
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def lm_eval_figures(export_dir: str, run: PretrainConfig, device: torch.device) -> dict[str, float]:
    """lm-evaluation-harness tasks on an export: ``lm_eval/<task>/<metric>`` figures (stderrs left out)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from dlm_ray.eval.lm_eval_adapter import DlmRayLM

    e, seed = run.eval, run.train.seed
    lm = DlmRayLM(export_dir, device=str(device), mc_samples=e.lm_eval_mc_samples, seed=seed, check_greedy=False)
    manager = TaskManager(include_path=e.lm_eval_include_path) if e.lm_eval_include_path else TaskManager()
    results = simple_evaluate(model=lm, tasks=list(e.lm_eval_tasks), task_manager=manager, limit=e.lm_eval_limit,
                              log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    return {f"lm_eval/{task}/{metric.split(',')[0]}": float(value)
            for task, figures in results["results"].items() for metric, value in figures.items()
            # "acc,none": a metric and its filter (the harness's other keys, such as sample_len, are not figures)
            if "," in metric and "stderr" not in metric and isinstance(value, (int, float)) and not isinstance(value, bool)}
