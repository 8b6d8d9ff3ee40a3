"""Fast decoding vs LLaDA's reference sampler on a trained model: speed and the checker's validity.

    python benchmarks/fast_sampling.py [--checkpoint runs/tiny/export] [--threads 2]

The model is the one ``python jobs/pretrain.py`` exports (it is trained first if missing). For each
generation length, the same held-out prompts of every corpus family go through: the reference
(one token per step), the threshold rule (τ = 0.9 unless ``--threshold``), threshold + prefix cache,
threshold + dual cache, and each of these again with early stop at EOS. Greedy (T = 0), blocks of
32, the same batches.
Prints model calls, answers/s, answer tokens/s (each answer's tokens up to and including its EOS:
the EOS filling the canvas after it is not counted, so early stopping is not flattered), the
wall-clock speed-up over the reference and the validity rate per configuration. Asserts nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from dlm_ray.io.checkpoint import load_inference
from dlm_ray.config.schema import CorpusConfig, SampleConfig
from dlm_ray.data.corpus import HELDOUT_SEED, check_answer, take_examples
from dlm_ray.core.inference import complete_texts
from dlm_ray.eval.compare import answer_tokens

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32


def variants(tau: float) -> dict[str, dict]:
    """name -> SampleConfig fields on top of the reference (one token per step, no early stop)."""
    t = {"threshold": tau}
    return {
        "reference": {},
        f"threshold {tau}": t,
        "threshold + prefix cache": {**t, "cache": "prefix"},
        "threshold + dual cache": {**t, "cache": "dual"},
        "reference + early stop": {"stop_at_eos": True},
        "threshold + early stop": {**t, "stop_at_eos": True},
        "threshold + prefix + early stop": {**t, "cache": "prefix", "stop_at_eos": True},
        "threshold + dual + early stop": {**t, "cache": "dual", "stop_at_eos": True},
    }


def run_variant(model, tok, prompts: list[str], cfg: SampleConfig, batch_size: int) -> tuple[float, int, list]:
    calls, comps = 0, []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]  # one generate() call each
        out = complete_texts(model, tok, chunk, cfg, list(range(i, i + len(chunk))), batch_size=len(chunk))
        calls += out[0].num_model_calls
        comps += out
    return time.perf_counter() - t0, calls, comps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "runs" / "tiny" / "export"))
    ap.add_argument("--lengths", default="64,224", help="generation lengths (multiples of 32 within the context)")
    ap.add_argument("--prompts-per-family", default="50,32", help="per length")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--threshold", type=float, default=0.9, help="τ of the threshold rule (Fast-dLLM: 0.9)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (Path(args.checkpoint) / "model.safetensors").is_file():
        print(f"no checkpoint at {args.checkpoint}: training one with jobs/pretrain.py", flush=True)
        subprocess.run([sys.executable, str(ROOT / "jobs" / "pretrain.py"), f"--export-dir={args.checkpoint}"],
                       check=True, cwd=ROOT)
    model, tok, meta = load_inference(args.checkpoint)
    families = sorted(CorpusConfig().families)
    lengths = [int(v) for v in args.lengths.split(",")]
    per_family = [int(v) for v in args.prompts_per_family.split(",")]
    print(f"checkpoint {args.checkpoint} (step {meta['source'].get('step')}), context {model.max_seq_len}, "
          f"{args.threads} threads, batch {args.batch_size}, blocks of {BLOCK}, greedy")
    for gen_length, n in zip(lengths, per_family):
        exs = [e for fam in families for e in take_examples({fam: 1.0}, n, seed=HELDOUT_SEED, split="heldout",
                                                             family=fam)]
        prompts = [e.prompt for e in exs]
        print(f"\ngen_length {gen_length}, {len(prompts)} prompts ({n} per family: {', '.join(families)})\n")
        print("| sampler | model calls | seconds | answers/s | answer tokens/s | speed-up | validity | per family |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        ref_s = None
        for name, fields in variants(args.threshold).items():
            cfg = SampleConfig(gen_length=gen_length, steps=gen_length, block_length=BLOCK, **fields)
            seconds, calls, comps = run_variant(model, tok, prompts, cfg, args.batch_size)
            ref_s = ref_s or seconds
            oks = [check_answer(e.prompt, c.text) for e, c in zip(exs, comps)]
            tokens = sum(answer_tokens(c) for c in comps)
            fam_rates = " ".join(f"{f[:4]} {sum(o for e, o in zip(exs, oks) if e.family == f) / n:.0%}" for f in families)
            print(f"| {name} | {calls} | {seconds:.1f} | {len(prompts) / seconds:.0f} | {tokens / seconds:.0f} | "
                  f"{ref_s / seconds:.2f}x | {sum(oks) / len(oks):.1%} | {fam_rates} |", flush=True)


if __name__ == "__main__":
    main()
