"""Train masked, block and embedding diffusion and autoregressive models on equal terms; compare them.

    python jobs/compare.py [--config jobs/configs/tiny.yaml] [--objectives=diffusion,block,autoregressive,embedding]
    ray job submit --working-dir . -- python jobs/compare.py --config jobs/configs/small.yaml --data.source=...

Each objective is a run of the pretraining job (``<run_name>-<objective>``: rerunning resumes it)
with the same corpus, model size, batch, steps and seed; only the kind (``model.attention``,
``model.noise``) differs. Then
each exported model is measured with the same code (``dlm_ray.eval.compare``), and the table is printed
and written to ``<storage_path>/<run_name>-compare/``: ``compare.json`` and ``compare.png``.
"""

from __future__ import annotations

import time


from dlm_ray.eval.checkpoints import evaluate_checkpoint
from dlm_ray.io.checkpoint import export, load_inference, run_dir
from dlm_ray.eval.compare import (OBJECTIVES, Row, measure_generation, objective_config, plot, rows_as_json, samplers,
                             table, train_tokens_per_s)
from dlm_ray.config.schema import PretrainConfig
from dlm_ray.config.io import parse_job_args
from dlm_ray.train.metrics import read_metrics, write_json_and_chart
from dlm_ray.core.model import num_params
from dlm_ray.runtime import init_ray
from dlm_ray.train.fit import fit


def _args(ap) -> None:  # type: ignore[no-untyped-def]
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated, from: " + ", ".join(OBJECTIVES))
    ap.add_argument("--block_size", type=int, default=4, help="the block objective's block size")
    ap.add_argument("--fast_threshold", type=float, default=0.9,
                    help="diffusion models are also measured committing every position this confident")
    ap.add_argument("--entropy_bounds", default="0.5,1",
                    help="and, for each of these comma-separated bounds, committing the most confident positions "
                         "while their summed entropy (nats) stays within it (the EB-sampler); '' for none")
    ap.add_argument("--ode_steps", default="3,6,12",
                    help="an embedding-diffusion model is measured at eval.sample's steps and at each of these "
                         "comma-separated step counts (the steps-versus-validity curve)")
    ap.add_argument("--gen_batches", default="1,64",
                    help="comma-separated prompts per generate() call: each sampler is timed at each (a user's "
                         "single request is batch 1; a batch job's throughput is a full batch)")


def _numbers(text: str, flag: str, kind: type, *, least: float) -> list:
    """Comma-separated numbers of at least ``least`` (batch sizes, entropy bounds), or a clear exit."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag} must be comma-separated {kind.__name__} values, got {text!r}") from None
    if not values or min(values) < least:
        raise SystemExit(f"{flag} needs at least one value, each >= {least:g}, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_job_args(PretrainConfig, argv, __doc__.splitlines()[0], _args)
    if cfg.init_from:
        raise SystemExit("compare trains every objective from scratch; init_from is not supported here")
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    batches = _numbers(args.gen_batches, "--gen_batches", int, least=1)
    bounds = tuple(_numbers(args.entropy_bounds, "--entropy_bounds", float, least=0)) if args.entropy_bounds.strip() else ()
    ode_steps = tuple(_numbers(args.ode_steps, "--ode_steps", int, least=1)) if args.ode_steps.strip() else ()
    if ode_steps and max(ode_steps) > cfg.eval.sample.gen_length:
        raise SystemExit(f"--ode_steps may not exceed eval.sample.gen_length={cfg.eval.sample.gen_length}, "
                         f"got {args.ode_steps!r}")
    configs = [objective_config(cfg, o, block_size=args.block_size) for o in objectives]  # names bad ones first
    t0 = time.time()
    init_ray()
    builtin = cfg.data.source == "builtin"
    print(f"[compare] {', '.join(objectives)} | model {num_params(cfg.model) / 1e6:.2f}M params | "
          f"{cfg.train.max_steps} steps of {cfg.train.batch_size} x {cfg.data.seq_len} tokens | data {cfg.data.source}",
          flush=True)
    rows: list[Row] = []
    for objective, ocfg in zip(objectives, configs):
        kind = f"{ocfg.model.attention} attention" + (", Gaussian noise" if ocfg.model.noise == "gaussian" else "")
        print(f"[compare] training {objective} ({kind}) as run {ocfg.run_name}", flush=True)
        result = fit(ocfg, evaluator=evaluate_checkpoint)
        out = run_dir(ocfg) + "/export"
        with result.checkpoint.as_directory() as ckpt:
            export(ckpt, out)
        history = read_metrics(run_dir(ocfg))
        bits = next((h["val_nelbo_bits"] for h in reversed(history) if h.get("val_nelbo_bits") is not None), None)
        model, tok, _ = load_inference(out)
        families = sorted(cfg.data.corpus.families) if builtin else None
        for name, sc in samplers(objective, cfg.eval.sample, args.fast_threshold, bounds, ode_steps).items():
            for batch in batches:
                measured = measure_generation(model, tok, sc, families=families,
                                              num_prompts=cfg.eval.num_prompts_per_family, batch_size=batch)
                row = Row.of(objective, name, batch, bits, train_tokens_per_s(history), measured)
                rows.append(row)
                print(f"[compare] {objective} / {name} / batch {batch}: validity {row.validity}, "
                      f"{row.answers_per_s:.0f} answers/s, {row.answer_tokens_per_s:.0f} answer tok/s, "
                      f"{row.calls_per_answer:.1f} calls per answer", flush=True)
    text = table(rows)
    print(text)
    where = f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}-compare"
    summary = {"objectives": objectives, "config": cfg.to_dict(), "block_size": args.block_size,
               "fast_threshold": args.fast_threshold, "entropy_bounds": list(bounds), "ode_steps": list(ode_steps),
               "gen_batches": batches,
               "rows": rows_as_json(rows), "table": text, "wall_seconds": round(time.time() - t0, 1)}
    write_json_and_chart(where, "compare.json", summary, "compare.png", lambda out: plot(rows, out))
    print(f"[compare] done in {summary['wall_seconds']:.0f} s; {where}/compare.json and compare.png", flush=True)
    return summary


if __name__ == "__main__":
    main()
