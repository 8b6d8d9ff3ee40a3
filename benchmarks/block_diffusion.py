"""Full-attention diffusion against block diffusion at two block sizes, side by side in one run.

    python benchmarks/block_diffusion.py [--steps 1000] [--prompts 50] [--blocks 4 16]

Each model is the tiny preset trained by ``fit`` on the built-in corpus with the default job's
settings (``jobs/configs/tiny.yaml``) for the same steps and tokens; only ``model.attention`` and
``model.block_size`` differ. Then, per model: held-out NELBO (bits/token, each model's own bound)
and, at the longest generation the context allows and at 64 tokens, validity per family, answers/s,
answer tokens/s (up to and including each answer's EOS; early stop at EOS on) and model calls, for the
reference sampler and the threshold rule, with the dual cache for full attention and the exact
block cache for block models. Prints a table and writes JSON. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dlm_ray.io.checkpoint import export, load_inference
from dlm_ray.config.schema import PretrainConfig, SampleConfig
from dlm_ray.config.io import load_config
from dlm_ray.data.corpus import HELDOUT_SEED, check_answer, take_examples
from dlm_ray.eval.scoring import heldout_bits_per_token
from dlm_ray.core.inference import complete_texts
from dlm_ray.eval.compare import answer_tokens
from dlm_ray.core.text import encode_prompt
from dlm_ray.train.metrics import read_metrics
from dlm_ray.runtime import init_ray
from dlm_ray.train.fit import fit

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("reverse", "sort", "sudoku")


def train(name: str, block: int | None, steps: int, storage: Path) -> dict:
    overrides = [f"--run_name=bench_{name}", f"--storage_path={storage}", f"--train.max_steps={steps}"]
    if block:
        overrides += ["--model.attention=block_causal", f"--model.block_size={block}"]
    cfg = load_config(PretrainConfig, ROOT / "jobs" / "configs" / "tiny.yaml", overrides)
    t = time.time()
    result = fit(cfg)
    seconds = time.time() - t
    with result.checkpoint.as_directory() as ckpt:
        out = export(ckpt, storage / f"export_{name}")
    history = read_metrics(f"{storage}/bench_{name}")
    tps = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
    return {"export": out, "train_seconds": seconds, "train_tokens_per_s": sum(tps) / max(1, len(tps))}


def samplers(block: int | None, gen: int) -> dict[str, SampleConfig]:
    if block is None:
        base = SampleConfig(gen_length=gen, steps=gen, block_length=32 if gen % 32 == 0 else gen, stop_at_eos=True)
        return {"reference": base, "threshold 0.9": base.model_copy(update={"threshold": 0.9}),
                "threshold 0.9 + dual cache": base.model_copy(update={"threshold": 0.9, "cache": "dual"})}
    base = SampleConfig(gen_length=gen, steps=gen, block_length=block, stop_at_eos=True)
    return {"reference": base, "threshold 0.9": base.model_copy(update={"threshold": 0.9}),
            "exact cache": base.model_copy(update={"cache": "blocks"}),
            "threshold 0.9 + exact cache": base.model_copy(update={"threshold": 0.9, "cache": "blocks"})}


def generation(model, tok, block: int | None, gen: int, prompts_per_family: int) -> list[dict]:
    exs = [e for fam in FAMILIES
           for e in take_examples({fam: 1.0}, prompts_per_family, seed=HELDOUT_SEED, split="heldout", family=fam)]
    prompts = [e.prompt for e in exs]
    rows = []
    for name, sc in samplers(block, gen).items():
        t = time.perf_counter()
        comps = complete_texts(model, tok, prompts, sc, list(range(len(prompts))), batch_size=len(prompts))
        seconds = time.perf_counter() - t
        ok = [check_answer(e.prompt, c.text) for e, c in zip(exs, comps)]
        per_family = {f: sum(o for e, o in zip(exs, ok) if e.family == f) / prompts_per_family for f in FAMILIES}
        tokens = sum(answer_tokens(c) for c in comps)
        rows.append({"sampler": name, "gen_length": gen, "answers_per_s": len(prompts) / seconds,
                     "answer_tokens_per_s": tokens / seconds,
                     "model_calls": comps[0].num_model_calls, "seconds": seconds, "validity": per_family})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--prompts", type=int, default=50, help="held-out prompts per family")
    ap.add_argument("--blocks", type=int, nargs=2, default=[4, 16])
    ap.add_argument("--out", default="block_diffusion.json")
    args = ap.parse_args()
    init_ray()
    storage = Path(tempfile.mkdtemp(prefix="bench_block_"))
    results = []
    for name, block in (("full", None), *((f"block{b}", b) for b in args.blocks)):
        run = train(name, block, args.steps, storage)
        model, tok, _ = load_inference(run["export"])
        bits = heldout_bits_per_token(model, tok, {f: 1.0 for f in FAMILIES}, num_docs=256, seq_len=64, num_samples=16)
        longest_prompt = max(len(encode_prompt(tok, e.prompt)) for fam in FAMILIES for e in
                             take_examples({fam: 1.0}, args.prompts, seed=HELDOUT_SEED, split="heldout", family=fam))
        unit = 32 if block is None else block
        longest = (model.max_seq_len - longest_prompt) // unit * unit
        gens = [g for gen in (longest, 64) for g in generation(model, tok, block, gen, args.prompts)]
        results.append({"model": name, "nelbo_bits": bits, **{k: v for k, v in run.items() if k != "export"},
                        "generation": gens})
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\ntiny preset, {args.steps} steps each (jobs/configs/tiny.yaml), {args.prompts} held-out prompts per family\n")
    print("| model | NELBO bits/token | train tokens/s |")
    print("| --- | --- | --- |")
    for r in results:
        print(f"| {r['model']} | {r['nelbo_bits']:.3f} | {r['train_tokens_per_s']:,.0f} |")
    print("\n| model | sampler | gen length | answers/s | answer tokens/s | model calls | " + " | ".join(FAMILIES) + " |")
    print("| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in FAMILIES) + " |")
    for r in results:
        for g in r["generation"]:
            print(f"| {r['model']} | {g['sampler']} | {g['gen_length']} | {g['answers_per_s']:,.0f} | "
                  f"{g['answer_tokens_per_s']:,.0f} | "
                  f"{g['model_calls']} | " + " | ".join(f"{g['validity'][f]:.0%}" for f in FAMILIES) + " |")


if __name__ == "__main__":
    main()
