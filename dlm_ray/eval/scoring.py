"""Scoring a denoiser on the built-in corpus: held-out NELBO and the checker's validity rate.

Pure torch (no Ray), so the pretraining job, the benchmarks and the tests measure quality the same
way. Prompts are the corpus prompts preceded by EOS, the document separator the model saw in
training; a completion is the generated text up to the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dlm_ray.config.schema import EvalConfig, SampleConfig
from dlm_ray.data.corpus import HELDOUT_SEED, MAX_ANSWER_CHARS, check_answer, check_document, take_examples
from dlm_ray.data.packing import Packer
from dlm_ray.core.diffusion import nats_to_bits
from dlm_ray.core.likelihood import estimate_nelbo
from dlm_ray.core.inference import Tok, complete_texts
from dlm_ray.core.kinds import kind_of_model
from dlm_ray.core.sampling import ModelFn


def corpus_rows(tok: Tok, families: dict[str, float], num_docs: int, seq_len: int, *, seed: int,
                split: str) -> dict[str, np.ndarray]:
    """``num_docs`` documents of a split packed as training packs them (``data.packing.Packer``):
    each followed by EOS, cut into ``seq_len`` rows, the last one padded (``attention_mask`` 0), so
    every token of every document is in a row."""
    if num_docs < 1:
        raise ValueError(f"num_docs must be at least 1, got {num_docs}")
    docs = take_examples(families, num_docs, seed=seed, split=split)
    packer = Packer(seq_len, tok.eos_id, tok.pad_id, key=f"scoring:{split}:{seed}")
    packer.add([np.asarray(tok.encode(d.text), dtype=np.int32) for d in docs])
    return packer.rows(final=True)


@torch.no_grad()
def heldout_bits_per_token(model: ModelFn, tok: Tok, families: dict[str, float], *, num_docs: int,
                           seq_len: int, num_samples: int, seed: int = HELDOUT_SEED, batch_size: int = 64) -> float:
    """Held-out NELBO in bits per token over every token of ``num_docs`` held-out documents (each
    with its EOS), packed into ``seq_len`` rows."""
    rows = corpus_rows(tok, families, num_docs, seq_len, seed=seed, split="heldout")
    ids_RL = torch.from_numpy(rows["input_ids"]).long()
    real_RL = torch.from_numpy(rows["attention_mask"]).long()
    gen = torch.Generator().manual_seed(seed)
    nelbo_R = torch.cat([estimate_nelbo(model, ids_RL[i:i + batch_size], mask_id=tok.mask_id, num_samples=num_samples,
                                        attention_mask=real_RL[i:i + batch_size], generator=gen)
                         for i in range(0, len(ids_RL), batch_size)])
    # A row's figure is per real token; weighted by its real tokens the mean is per token, so the
    # padded last row counts for the tokens it holds, not as a whole row.
    n_R = real_RL.sum(-1).double()
    return float(nats_to_bits((nelbo_R.double() * n_R).sum() / n_R.sum()))


def sample_for_family(cfg: SampleConfig, family: str) -> SampleConfig:
    """``cfg`` lengthened, if needed, to hold ``family``'s longest answer and its EOS: gen_length,
    steps and block_length times the smallest whole factor that does, so the number of blocks and
    the tokens committed per step stay as configured. A setting too short for a family would score
    every answer it cuts off as wrong, measuring the setting instead of the model."""
    need = MAX_ANSWER_CHARS[family] + 1
    if cfg.gen_length >= need:
        return cfg
    k = -(-need // cfg.gen_length)
    return cfg.model_copy(update={"gen_length": cfg.gen_length * k, "steps": cfg.steps * k,
                                  "block_length": cfg.block_length * k})


@dataclass
class ValidityReport:
    rates: dict[str, float]
    samples: dict[str, list[tuple[str, str, bool]]] = field(default_factory=dict)  # (prompt, completion, ok)


@torch.no_grad()
def validity(model: ModelFn, tok: Tok, families: list[str], cfg: SampleConfig, *, num_prompts: int,
             seed: int = HELDOUT_SEED, batch_size: int = 100, num_unconditional: int = 0) -> ValidityReport:
    """Fraction of held-out prompts per family whose completion the checker accepts.

    With ``num_unconditional`` > 0 also samples that many documents from an empty context (EOS only)
    (at temperature >= 1) and reports the fraction that are valid documents of any family under
    ``"unconditional"``.
    """
    rates: dict[str, float] = {}
    samples: dict[str, list[tuple[str, str, bool]]] = {}
    kind = kind_of_model(model)

    def complete(prompts: list[str], cfg: SampleConfig) -> list[str]:
        seeds = [seed + i for i in range(len(prompts))]
        return [c.text for c in complete_texts(model, tok, prompts, cfg, seeds, batch_size=batch_size)]

    for fam in families:
        exs = take_examples({fam: 1.0}, num_prompts, seed=seed, split="heldout", family=fam)
        comps = complete([e.prompt for e in exs], kind.resolve(sample_for_family(cfg, fam)))
        oks = [check_answer(e.prompt, c) for e, c in zip(exs, comps)]
        rates[fam] = sum(oks) / len(oks)
        samples[fam] = [(e.prompt, c, ok) for e, c, ok in zip(exs[:3], comps[:3], oks[:3])]
    if num_unconditional:
        # Greedy decoding from one shared context would give one document num_unconditional times.
        cfg = kind.resolve(cfg)
        docs = complete([""] * num_unconditional, cfg.model_copy(update={"temperature": max(cfg.temperature, 1.0)}))
        oks = [check_document(d)[1] for d in docs]
        rates["unconditional"] = sum(oks) / len(oks)
        samples["unconditional"] = [("", d, ok) for d, ok in zip(docs[:3], oks[:3])]
    return ValidityReport(rates, samples)


def score(model: ModelFn, tok: Tok, families: dict[str, float], cfg: EvalConfig, *, seq_len: int) -> dict:
    """Held-out NELBO (bits/token) and validity per family (plus unconditional) in one dict."""
    bits = heldout_bits_per_token(model, tok, families, num_docs=cfg.num_nelbo_docs, seq_len=seq_len,
                                  num_samples=cfg.nelbo_samples)
    rep = validity(model, tok, sorted(families), cfg.sample, num_prompts=cfg.num_prompts_per_family,
                   num_unconditional=cfg.num_prompts_per_family)
    return {"nelbo_bits": bits, "validity": rep.rates, "samples": rep.samples}
