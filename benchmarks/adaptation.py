"""Adapting an autoregressive model into a diffusion model: held-out bits/token and validity per
family after chosen numbers of steps, by the pretraining job's own training and scoring.

    python benchmarks/adaptation.py --init_from=runs/tiny-ar/export --model.attention=full
    python benchmarks/adaptation.py --init_from=runs/tiny-ar/export --model.attention=block_causal \\
        --model.block_size=4 --run_name=adapt-block
    python benchmarks/adaptation.py --steps=1500 --model.attention=block_causal --model.block_size=4 \\
        --run_name=scratch-block                    # the same measurement from scratch

Any config field can be overridden as in ``jobs/pretrain.py`` (the adaptation recipe, ``adapt.*``,
included). One run of ``fit`` to the last of ``--steps`` keeps a checkpoint at each of them; each is
exported and scored as ``jobs/pretrain.py`` scores its export (``dlm_ray.eval.scoring.score``), next
to the starting model. Prints a table and writes ``adaptation.json`` and ``adaptation.png`` (the
curve) into the run directory. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from dlm_ray.config.io import parse_job_args
from dlm_ray.config.schema import PretrainConfig
from dlm_ray.core.model import Denoiser
from dlm_ray.core.tokenizer import load_tokenizer
from dlm_ray.eval.scoring import score
from dlm_ray.io.checkpoint import STATE_FILE, export, load_inference, run_dir
from dlm_ray.runtime import init_ray
from dlm_ray.train.fit import adaptation_line, fit, with_init_from
from dlm_ray.train.metrics import read_metrics, write_json_and_chart


def _args(ap) -> None:  # type: ignore[no-untyped-def]
    ap.add_argument("--steps", default="100,300,500", help="comma-separated steps to score (the last ends the run)")


def checkpoints_by_step(cfg: PretrainConfig) -> dict[int, str]:
    """Every kept checkpoint of the run, by its step."""
    import pyarrow.fs as pafs

    from dlm_ray.io.storage import filesystem_for

    filesystem, root = filesystem_for(run_dir(cfg))
    out = {}
    for entry in filesystem.get_file_info(pafs.FileSelector(root)):
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith("checkpoint_"):
            with filesystem.open_input_stream(f"{entry.path}/{STATE_FILE}") as f:
                out[json.loads(f.read())["step"]] = entry.path
    return out


def row(label: str, s: dict[str, Any]) -> dict[str, Any]:
    return {"model": label, "bits": round(s["nelbo_bits"], 3), **{k: round(v, 3) for k, v in s["validity"].items()}}


def table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in rows[0] if c not in ("model", "bits")]
    lines = [f"| model | bits/token | {' | '.join(cols)} |", "| --- | --- |" + " --- |" * len(cols)]
    lines += [f"| {r['model']} | {r['bits']:.3f} | " + " | ".join(f"{r[c]:.0%}" for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], steps: list[int], out: Any) -> None:
    """Validity per family (left axis; step 0 is the starting model) and held-out bits/token (right,
    the trained steps only: an autoregressive start's figure is an exact NLL, not a bound) against
    the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = rows[-len(steps):]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for fam in [c for c in points[0] if c not in ("model", "bits")]:
        ax.plot([0, *steps], [100 * p[fam] for p in [rows[0], *points]], marker="o", label=fam)
    ax.set_xlabel("step")
    ax.set_ylabel("validity %")
    ax.set_ylim(0, 105)
    right = ax.twinx()
    right.plot(steps, [p["bits"] for p in points], "k--", marker="s", label="bits/token")
    right.set_ylabel("held-out bits/token")
    ax.legend(loc="lower left", fontsize=8)
    right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    _args(first)
    steps = sorted({int(s) for s in first.parse_known_args(argv)[0].steps.split(",")})
    every = math.gcd(*steps)
    argv += [f"--train.max_steps={steps[-1]}", f"--train.checkpoint_every={every}", f"--train.eval_every={every}",
             f"--train.num_to_keep={steps[-1] // every}"]
    cfg, _ = parse_job_args(PretrainConfig, argv, __doc__.splitlines()[0], _args)
    t0 = time.time()
    init_ray()
    cfg = with_init_from(cfg)
    print(adaptation_line(cfg) or f"[adaptation] from scratch: {cfg.model.attention} attention", flush=True)
    tok = load_tokenizer(cfg.tokenizer)
    families = cfg.data.corpus.families
    start = load_inference(cfg.init_from)[0] if cfg.init_from else Denoiser(cfg.model).eval()
    rows = [row("init_from" if cfg.init_from else "untrained", score(start, tok, families, cfg.eval,
                                                                     seq_len=cfg.data.seq_len))]
    print(table(rows), flush=True)
    t_train = time.time()
    fit(cfg)
    train_s = time.time() - t_train
    kept = checkpoints_by_step(cfg)
    for step in steps:
        out = export(kept[step], f"{run_dir(cfg)}/export-{step}")
        rows.append(row(f"step {step}", score(load_inference(out)[0], tok, families, cfg.eval, seq_len=cfg.data.seq_len)))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    history = read_metrics(run_dir(cfg))
    summary = {"config": cfg.to_dict(), "steps": steps, "rows": rows, "table": text, "train_seconds": round(train_s, 1),
               "val_nelbo_bits": [[h["step"], h["val_nelbo_bits"]] for h in history if h.get("val_nelbo_bits")],
               "wall_seconds": round(time.time() - t0, 1)}
    write_json_and_chart(run_dir(cfg), "adaptation.json", summary, "adaptation.png", lambda f: plot(rows, steps, f))
    print(text)
    print(f"[adaptation] done in {summary['wall_seconds']:.0f} s (training {train_s:.0f} s); "
          f"{run_dir(cfg)}/adaptation.json and adaptation.png", flush=True)
    return summary


if __name__ == "__main__":
    main()
