"""Logits of the Llama / Qwen2 / Qwen3 / Dream layouts against transformers' own classes.

    python benchmarks/layout_logits.py

Tiny random models built from transformers' config classes (nothing downloaded), saved with
``save_pretrained`` and read with ``load_inference``; and our autoregressive exports read back with
``AutoModelForCausalLM``. Prints the largest |ours - transformers| over real positions (float32),
unpadded and left-padded. The tests assert the bound (1e-5); this prints the figures.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: its tests' helpers

from dlm_ray.config.schema import ModelConfig  # noqa: E402
from dlm_ray.io.checkpoint import load_inference, save_inference  # noqa: E402
from tests.conftest import QWEN_SHAPE, family_model  # noqa: E402
from tests.hf_dirs import NUM_TOKENS, batch, hf_model, reference_logits, save_hf  # noqa: E402


def error(ours: torch.Tensor, ref: torch.Tensor, keep: torch.Tensor) -> float:
    return (ours[:, :, :ref.shape[-1]] - ref)[keep.bool()].abs().max().item()


def shifted(logits_BLV: torch.Tensor) -> torch.Tensor:
    return torch.cat([logits_BLV[:, :1], logits_BLV[:, :-1]], 1)


@torch.no_grad()
def measure(tmp: Path) -> list[tuple[str, bool, float]]:
    rows = []
    llama3 = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}
    for name, family, update in (("llama", "llama", {}), ("llama, llama3 rope scaling", "llama", llama3),
                                 ("qwen2", "qwen2", {}), ("qwen3", "qwen3", {})):
        ref = hf_model(family, **update)
        model = load_inference(save_hf(ref, tmp / name))[0]
        for padded in (False, True):
            ids, am = batch(padded=padded)
            rows.append((f"import {name}", padded, error(model(ids, am), reference_logits(ref, ids, am), am)))
    ref = hf_model("qwen2", tie_word_embeddings=False)
    model = load_inference(save_hf(ref, tmp / "dream", mask=True,
                                   config={"model_type": "Dream", "mask_token_id": NUM_TOKENS}))[0]
    for padded in (False, True):
        ids, am = batch(padded=padded)
        # A shifted position reads the one before it: compare where both are real.
        keep = am.bool() & torch.cat([torch.ones_like(am[:, :1]), am[:, :-1]], 1).bool()
        want = shifted(reference_logits(ref, ids, am, bidirectional=True))
        rows.append(("import Dream (shifted, bidirectional)", padded, error(model(ids, am), want, keep)))
    from transformers import AutoModelForCausalLM

    base = ModelConfig(preset="tiny", d_model=64, n_layers=2, n_heads=4, d_mlp=128, max_seq_len=128)
    shapes = ({}, {"n_kv_heads": 2, "qkv_bias": True, "tie_embeddings": True},
              {k: v for k, v in QWEN_SHAPE.items() if k != "shift_logits"})
    for i, shape in enumerate(shapes):
        ours = family_model(base, "llada", attention="causal", init_std=0.2, vocab_size=NUM_TOKENS, **shape).eval()
        out = save_inference(ours, {"kind": "byte"}, tmp / f"ar{i}")
        theirs = AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
        name = f"export AR -> {json.loads((out / 'config.json').read_text())['model_type']}"
        for padded in (False, True):
            ids, am = batch(padded=padded)
            rows.append((name, padded, error(ours(ids, am), reference_logits(theirs, ids, am), am)))
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp))
    print("| case | padding | max abs error (float32) |\n| --- | --- | --- |")
    for name, padded, err in rows:
        print(f"| {name} | {'left-padded' if padded else 'none'} | {err:.2e} |")


if __name__ == "__main__":
    main()
