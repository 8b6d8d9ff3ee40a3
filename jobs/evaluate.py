"""Standard benchmarks through EleutherAI's lm-evaluation-harness, for any checkpoint we load.

    pip install -e ".[eval]"
    python jobs/evaluate.py --checkpoint runs/tiny/export --tasks arc_easy,hellaswag --limit 200
    python jobs/evaluate.py --checkpoint runs/tiny/export --tasks my_task --include_path my_tasks/

Multiple-choice tasks are scored by the Monte Carlo ELBO of each choice given the question, as
LLaDA evaluates (``--mc_samples`` draws, 128 as LLaDA's; an autoregressive model gives its exact
likelihood), and ``is_greedy`` by LLaDA's suffix greedy decoding (``--no-check_greedy`` skips it);
generation tasks run our sampler. The harness downloads its datasets on first use, so run standard
tasks on a machine that can reach the Hugging Face Hub (or has them in its cache);
``--include_path`` adds task YAML files of your own, which may read local JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="an export directory (ours or LLaDA's), local or a URI")
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ap.add_argument("--include_path", default=None, help="a directory of extra task YAML files")
    ap.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    ap.add_argument("--num_fewshot", type=int, default=None)
    ap.add_argument("--mc_samples", type=int, default=128, help="Monte Carlo draws per likelihood (LLaDA's 128)")
    ap.add_argument("--check_greedy", action=argparse.BooleanOptionalAction, default=True,
                    help="decode each continuation for is_greedy (a model call per token; accuracy never reads it)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--gen_length", type=int, default=64, help="default answer length for generation tasks")
    ap.add_argument("--block_length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64, help="sampler steps for gen_length tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="write the harness's results here as JSON")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from dlm_ray.eval.lm_eval_adapter import DlmRayLM

    sample = {"gen_length": args.gen_length, "block_length": min(args.block_length, args.gen_length),
              "steps": args.steps}
    lm = DlmRayLM(args.checkpoint, device=args.device, mc_samples=args.mc_samples, batch_size=args.batch_size,
                  seed=args.seed, sample=sample, check_greedy=args.check_greedy)
    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    results = simple_evaluate(model=lm, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                              task_manager=manager, limit=args.limit, num_fewshot=args.num_fewshot,
                              log_samples=False, random_seed=args.seed, numpy_random_seed=args.seed,
                              torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    print(make_table(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"results": results["results"], "config": vars(args)}, indent=2,
                                                default=str))
    return results


if __name__ == "__main__":
    main()
