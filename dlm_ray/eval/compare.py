"""Diffusion against autoregression on equal terms: the objectives, the measurements, the table.

An objective is a model kind (``model.attention``) and nothing else: every objective is trained on
the same corpus, model size, batch, steps and seed by the same job, and scored by the same code.

- ``diffusion``: full attention, the masked diffusion ELBO (LLaDA / MDLM);
- ``block``: block-causal attention, block diffusion (BD3-LM), blocks of ``block_size``;
- ``autoregressive``: causal attention, the next-token loss.

Held-out bits/token is the training job's held-out figure: the NELBO (an upper bound on the NLL)
for the diffusion objectives, the exact NLL for the autoregressive one (so a gap in the diffusion
objectives' disfavour is partly the bound's looseness). Generation is measured per sampler on the
built-in corpus's held-out prompts (validity per family by the exact checker), or on any other
corpus from an empty context: generated tokens per second (canvas positions filled) and model
calls per answer. Pure torch and matplotlib: ``jobs/compare.py`` runs the training.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dlm_ray.config.schema import ModelConfig, PretrainConfig, SampleConfig
from dlm_ray.data.corpus import HELDOUT_SEED, check_answer, take_examples
from dlm_ray.core.inference import complete_texts
from dlm_ray.core.kinds import kind_of_model

OBJECTIVES = ("diffusion", "block", "autoregressive")


def objective_config(cfg: PretrainConfig, objective: str, *, block_size: int) -> PretrainConfig:
    """``cfg`` with the model kind of ``objective`` and a run name of its own; all else equal."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    attention = {"diffusion": "full", "block": "block_causal", "autoregressive": "causal"}[objective]
    model = ModelConfig.model_validate({**cfg.model.model_dump(exclude={"preset"}), "attention": attention,
                                        "block_size": block_size})
    return PretrainConfig.model_validate({**cfg.model_dump(), "model": model.model_dump(),
                                          "run_name": f"{cfg.run_name}-{objective}"})


def samplers(objective: str, base: SampleConfig, fast_threshold: float | None) -> dict[str, SampleConfig]:
    """The samplers an objective is measured with. Every one stops a row at its EOS, so no
    objective pays for positions after the answer. Diffusion models also run the fast setting
    (commit every position above the confidence threshold, at least one per call); an
    autoregressive model writes one token per call whatever the setting."""
    plain = base.model_copy(update={"stop_at_eos": True})
    out = {"reference" if objective != "autoregressive" else "greedy": plain}
    if objective != "autoregressive" and fast_threshold is not None:
        out[f"threshold {fast_threshold:g}"] = plain.model_copy(update={"threshold": fast_threshold})
    return out


@dataclass
class Row:
    """One line of the table: an objective with one sampler."""

    objective: str
    sampler: str
    heldout_bits: float | None
    train_tokens_per_s: float | None
    gen_tokens_per_s: float
    calls_per_answer: float
    validity: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def measure_generation(model: Any, tok: Any, cfg: SampleConfig, *, families: list[str] | None, num_prompts: int,
                       batch_size: int) -> tuple[dict[str, float], float, float]:
    """(validity per family, generated tokens/s, model calls per answer) for one sampler. With
    ``families`` (the built-in corpus) ``num_prompts`` held-out prompts of each; without, as many
    unconditional samples (from EOS alone) at temperature >= 1."""
    cfg = kind_of_model(model).resolve(cfg)
    jobs = [(fam, take_examples({fam: 1.0}, num_prompts, seed=HELDOUT_SEED, split="heldout", family=fam))
            for fam in families] if families else [(None, None)]
    validity: dict[str, float] = {}
    # One untimed call first: the first calls of a process pay one-off costs (allocator, kernels).
    complete_texts(model, tok, [""] * min(batch_size, 8), cfg, list(range(min(batch_size, 8))), batch_size=batch_size)
    seconds = positions = calls = answers = 0.0
    for fam, examples in jobs:
        prompts = [e.prompt for e in examples] if examples else [""] * num_prompts
        run = cfg if examples else cfg.model_copy(update={"temperature": max(cfg.temperature, 1.0)})
        t0 = time.perf_counter()
        comps = complete_texts(model, tok, prompts, run, [HELDOUT_SEED + i for i in range(len(prompts))],
                               batch_size=batch_size)
        seconds += time.perf_counter() - t0
        positions += sum(c.num_generated for c in comps)
        calls += sum(c.num_model_calls for c in comps)
        answers += len(comps)
        if examples:
            validity[fam] = sum(check_answer(e.prompt, c.text) for e, c in zip(examples, comps)) / len(comps)
    return validity, positions / seconds, calls / answers


def train_tokens_per_s(history: list[dict[str, Any]]) -> float | None:
    """The median of the run's logged training throughput, the first window (start-up) left out."""
    rates = sorted(r["tokens_per_s"] for r in history[1:] if r.get("tokens_per_s"))
    return rates[len(rates) // 2] if rates else None


def table(rows: list[Row]) -> str:
    """The comparison as aligned text, one line per objective and sampler."""
    fams = sorted({f for r in rows for f in r.validity})
    head = (f"{'objective':15s} {'sampler':14s} {'bits/token':>10s} "
            + " ".join(f"{f:>8s}" for f in fams) + f" {'train tok/s':>11s} {'gen tok/s':>9s} {'calls/answer':>12s}")
    lines = [head]
    for r in rows:
        bits = f"{r.heldout_bits:10.3f}" if r.heldout_bits is not None else f"{'-':>10s}"
        train = f"{r.train_tokens_per_s:11.0f}" if r.train_tokens_per_s else f"{'-':>11s}"
        lines.append(f"{r.objective:15s} {r.sampler:14s} {bits} "
                     + " ".join(f"{r.validity.get(f, float('nan')):8.0%}" for f in fams)
                     + f" {train} {r.gen_tokens_per_s:9.0f} {r.calls_per_answer:12.1f}")
    return "\n".join(lines)


def rows_as_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def plot(rows: list[Row], out: Any) -> None:
    """A PNG of grouped bars: validity per family, held-out bits/token, and model calls per answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.objective}\n{r.sampler}" for r in rows]
    fams = sorted({f for r in rows for f in r.validity})
    panels = (1 if fams else 0) + 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    x = range(len(rows))
    k = 0
    if fams:
        width = 0.8 / len(fams)
        for j, f in enumerate(fams):
            axes[0].bar([i + j * width for i in x], [100 * r.validity.get(f, 0.0) for r in rows], width, label=f)
        axes[0].set_xticks([i + 0.4 - width / 2 for i in x], labels, fontsize=7)
        axes[0].set_ylabel("validity (%)")
        axes[0].set_ylim(0, 105)
        axes[0].legend(fontsize=8, loc="lower left")
        k = 1
    axes[k].bar(list(x), [r.heldout_bits or 0.0 for r in rows], color="tab:gray")
    axes[k].set_ylabel("held-out bits/token (lower is better)")
    axes[k + 1].bar(list(x), [r.calls_per_answer for r in rows], color="tab:purple")
    axes[k + 1].set_ylabel("model calls per answer")
    for ax in axes[k:]:
        ax.set_xticks(list(x), labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
