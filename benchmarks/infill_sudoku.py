"""Sudoku solved in place: the answer grid with its givens written in and masks at the blanks,
filled by ``sampling.infill``, next to generating the whole answer after the prompt.

    python benchmarks/infill_sudoku.py --checkpoint runs/tiny/export [--puzzles 200]

Both are scored by the exact checker on the same held-out puzzles, with their model calls. In
place, the model fills only the blanks (10 of 16 cells) and sees the givens on both sides of each.
"""

from __future__ import annotations

import argparse
import time

import torch

from dlm_ray.core.batching import left_pad
from dlm_ray.io.checkpoint import load_inference
from dlm_ray.config.schema import SampleConfig
from dlm_ray.data.corpus import HELDOUT_SEED, check_answer, take_examples
from dlm_ray.core.inference import complete_texts
from dlm_ray.core.sampling import infill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/tiny/export")
    ap.add_argument("--puzzles", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    model, tok, _ = load_inference(args.checkpoint)
    exs = take_examples({"sudoku": 1.0}, args.puzzles, seed=HELDOUT_SEED, split="heldout", family="sudoku")

    t0 = time.perf_counter()
    gen = SampleConfig(gen_length=24, steps=24, block_length=24, stop_at_eos=True)
    comps = complete_texts(model, tok, [e.prompt for e in exs], gen, [HELDOUT_SEED + i for i in range(len(exs))],
                           batch_size=args.batch)
    gen_s = time.perf_counter() - t0
    gen_ok = sum(check_answer(e.prompt, c.text) for e, c in zip(exs, comps)) / len(exs)
    gen_calls = sum(c.num_model_calls for c in comps) / len(comps)

    t0 = time.perf_counter()
    ok = calls = 0
    for k in range(0, len(exs), args.batch):
        chunk = exs[k:k + args.batch]
        canvases = []
        for e in chunk:
            puzzle = e.prompt[1:-1]  # q<16 cells>=
            grid = [tok.mask_id if c == "." else tok.encode(c)[0] for c in puzzle]
            canvases.append([tok.eos_id, *tok.encode(e.prompt), *grid])
        ids, am = left_pad(canvases, tok.pad_id)
        stats: dict[str, int] = {}
        # One commit per step, as the generation above: one step per blank.
        out = infill(model, ids, SampleConfig(gen_length=16, steps=16, block_length=16), mask_id=tok.mask_id,
                     attention_mask=am, stats=stats, vocab_size=tok.vocab_size)
        for e, row in zip(chunk, out[:, -16:].tolist()):
            ok += check_answer(e.prompt, tok.decode(row))
        calls += stats["model_calls"] * len(chunk)
    fill_s = time.perf_counter() - t0
    print(f"{'method':24s} {'valid':>7s} {'calls/puzzle':>13s} {'seconds':>8s}")
    print(f"{'generate after prompt':24s} {gen_ok:7.0%} {gen_calls:13.1f} {gen_s:8.1f}")
    print(f"{'infill the grid in place':24s} {ok / len(exs):7.0%} {calls / len(exs):13.1f} {fill_s:8.1f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
