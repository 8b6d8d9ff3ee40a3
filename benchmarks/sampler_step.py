"""Where a sampler step's time goes: the model's forward passes, and everything else.

    python benchmarks/sampler_step.py                      # tiny, random weights, batch 64, on CPU
    python benchmarks/sampler_step.py --checkpoint runs/tiny/export --batch 1

Each row runs one sampler over the same batch of prompts (greedy, stop at EOS) with the model's
forward entry points (``forward``, ``prefill``, ``forward_block``, ``forward_window``) timed; the
rest of ``generate`` (proposals, confidences, commits, the early stop, cache bookkeeping) is the
time outside the model. With random weights (the default) no threshold fires, so every step commits
the schedule's one token: the profile is of a step, not of a trained model's decoding. Needs torch
only (no Ray): ``benchmarks/gpu_check.py`` runs the same profile on a GPU. Prints a table; asserts
nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, uninstalled

from dlm_ray.config.schema import ModelConfig, SampleConfig  # noqa: E402
from dlm_ray.core.kinds import kind_of_model  # noqa: E402
from dlm_ray.core.model import Denoiser  # noqa: E402
from dlm_ray.core.sampling import generate  # noqa: E402

ENTRY_POINTS = ("forward", "prefill", "forward_block", "forward_window")


@dataclass
class StepProfile:
    seconds: float
    forward_seconds: float
    calls: int

    @property
    def outside_share(self) -> float:
        """The share of the sampler's time spent outside the model's forward passes."""
        return 1 - self.forward_seconds / self.seconds if self.seconds else 0.0


class ForwardTimer:
    """Times a model's forward entry points (outermost call only: ``prefill`` may run ``forward``
    inside); on a GPU each timed call is bracketed by synchronisations, so queued work is counted
    where it was launched."""

    def __init__(self, model: Any, sync: Callable[[], None]) -> None:
        self.seconds, self.calls, self._depth, self._sync = 0.0, 0, 0, sync
        for name in ENTRY_POINTS:
            if hasattr(model, name):
                setattr(model, name, self._wrap(getattr(model, name)))

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._sync()
            self._depth += 1
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                self._sync()
                return out
            finally:
                self._depth -= 1
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed

    def remove(self, model: Any) -> None:
        """The model's own methods again."""
        for name in ENTRY_POINTS:
            model.__dict__.pop(name, None)


def profile(model: Any, prompts_BP: torch.Tensor, cfg: SampleConfig, *, mask_id: int, eos_id: int,
            repeats: int = 3) -> StepProfile:
    """The sampler's wall time and the part of it inside the model (the best of ``repeats`` runs,
    after one untimed run)."""
    device = prompts_BP.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = kind_of_model(model).resolve(cfg)
    timer = ForwardTimer(model, sync)
    best: StepProfile | None = None
    for i in range(repeats + 1):
        timer.seconds, timer.calls = 0.0, 0
        sync()
        t0 = time.perf_counter()
        generate(model, prompts_BP, cfg, mask_id=mask_id, eos_id=eos_id)
        sync()
        run = StepProfile(time.perf_counter() - t0, timer.seconds, timer.calls)
        if i and (best is None or run.seconds < best.seconds):
            best = run
    timer.remove(model)
    assert best is not None
    return best


def samplers(gen: int, block: int) -> dict[str, tuple[str, SampleConfig]]:
    """name -> (model attention, settings): each kind with the settings its fast path uses."""
    base = SampleConfig(gen_length=gen, steps=gen, block_length=block, stop_at_eos=True)
    fast = base.model_copy(update={"threshold": 0.9})
    return {
        "diffusion, no cache": ("full", fast),
        "diffusion, dual cache": ("full", fast.model_copy(update={"cache": "dual"})),
        "block diffusion, exact cache": ("block_causal", fast),
        "autoregressive, KV cache": ("causal", base),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint", help="a trained export instead of random weights (its own kind only)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--block", type=int, default=8, help="block length (the block model's block size too)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = samplers(args.gen, args.block)
    models: dict[str, Any] = {}
    if args.checkpoint:
        from dlm_ray.io.checkpoint import load_inference

        model, tok, _ = load_inference(args.checkpoint)
        models[model.config.attention] = model.to(device)
        mask_id, eos_id, vocab = tok.mask_id, tok.eos_id, tok.vocab_size
    else:
        mask_id, eos_id, vocab = 3, 1, None
    print(f"{args.checkpoint or args.preset + ' (random weights)'} on {device}, batch {args.batch}, prompt "
          f"{args.prompt}, {args.gen} tokens in blocks of {args.block}, greedy, threshold 0.9, {args.threads} threads\n")
    print("| sampler | model calls | ms per call | sampler ms | inside the model | outside |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (attention, cfg) in rows.items():
        if attention not in models:
            if args.checkpoint:
                continue
            mc = ModelConfig(preset=args.preset, attention=attention, block_size=args.block)
            models[attention] = Denoiser(mc).to(device).eval()
        model = models[attention]
        high = vocab or model.config.vocab_size
        prompts = torch.randint(4, high, (args.batch, args.prompt), device=device)
        p = profile(model, prompts, cfg, mask_id=mask_id, eos_id=eos_id)
        print(f"| {name} | {p.calls} | {1e3 * p.forward_seconds / max(p.calls, 1):.2f} | {1e3 * p.seconds:.1f} | "
              f"{1e3 * p.forward_seconds:.1f} ms | {p.outside_share:.0%} |", flush=True)


if __name__ == "__main__":
    main()
