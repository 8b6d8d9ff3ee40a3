"""Pretrain the denoiser on the built-in corpus in one process, then score it.

    python jobs/pretrain.py [--config jobs/configs/tiny.yaml] [--train.max_steps=300 ...]

Prints held-out NELBO (bits/token) and the checker's validity per task family, before and after
training, and a few decoded samples.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import numpy as np
import torch

from dlm_ray.config import PretrainConfig, load_config
from dlm_ray.corpus import iter_examples
from dlm_ray.diffusion import diffusion_loss, mask_batch
from dlm_ray.evaluate import heldout_bits_per_token, pack_stream, validity
from dlm_ray.model import Denoiser, num_params
from dlm_ray.tokenizer import load_tokenizer


def score(model, tok, cfg: PretrainConfig, label: str) -> dict:
    model.eval()
    e = cfg.eval
    bits = heldout_bits_per_token(model, tok, cfg.data.corpus.families, num_docs=e.num_nelbo_docs,
                                  seq_len=cfg.data.seq_len, num_samples=e.nelbo_samples)
    rep = validity(model, tok, sorted(cfg.data.corpus.families), e.sample, num_prompts=e.num_prompts_per_family,
                   num_unconditional=e.num_prompts_per_family)
    model.train()
    print(f"[{label}] held-out NELBO {bits:.3f} bits/token; validity " +
          ", ".join(f"{k} {v:.0%}" for k, v in rep.rates.items()), flush=True)
    return {"nelbo_bits": bits, "validity": rep.rates, "samples": rep.samples}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None)
    args, overrides = ap.parse_known_args(argv)
    cfg = load_config(PretrainConfig, args.config, overrides)
    t0, tc = time.time(), cfg.train
    torch.manual_seed(tc.seed)
    tok = load_tokenizer(cfg.tokenizer)
    model = Denoiser(cfg.model)
    print(f"model: {num_params(cfg.model) / 1e6:.2f}M params; corpus families {cfg.data.corpus.families}", flush=True)
    before = score(model, tok, cfg, "untrained")

    docs = iter_examples(cfg.data.corpus.families, seed=cfg.data.corpus.seed, split="train")
    rng = np.random.default_rng(tc.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    need = tc.batch_size * cfg.data.seq_len
    t_train = time.time()
    for step in range(tc.max_steps):
        if tc.max_minutes and time.time() - t_train > 60 * tc.max_minutes:
            break
        chunk = [tok.encode(d.text) for _, d in itertools.islice(docs, need // 8)]
        x0 = pack_stream(chunk, cfg.data.seq_len, tok.eos_id)[: tc.batch_size]
        b = mask_batch(x0, np.ones_like(x0, bool), cfg.diffusion, rng, mask_id=tok.mask_id)
        warm = min(1.0, (step + 1) / max(1, tc.warmup_steps))
        cos = 0.5 * (1 + math.cos(math.pi * step / tc.max_steps))
        for g in opt.param_groups:
            g["lr"] = tc.lr * warm * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cos)
        logits = model(torch.from_numpy(b["noisy_ids"]))
        loss = diffusion_loss(logits, torch.from_numpy(x0), torch.from_numpy(b["loss_mask"]),
                              torch.from_numpy(b["p_mask"]), x0.size, mask_id=tok.mask_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        if step % tc.log_every == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t_train:.0f}s)", flush=True)
    train_s = time.time() - t_train
    after = score(model, tok, cfg, "trained")
    for fam, rows in after["samples"].items():
        for prompt, comp, ok in rows:
            print(f"  {fam:13s} {prompt!r:24s} -> {comp!r} {'ok' if ok else 'wrong'}")
    summary = {"steps": step + 1, "train_seconds": round(train_s, 1), "wall_seconds": round(time.time() - t0, 1),
               "nelbo_bits_before": before["nelbo_bits"], "nelbo_bits_after": after["nelbo_bits"],
               "validity_before": before["validity"], "validity_after": after["validity"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
