"""Diffusion against autoregression on equal terms: the objectives, the measurements, the table.

An objective is a model kind (``model.attention``, ``model.noise``) and nothing else: every
objective is trained on the same corpus, model size, batch, steps and seed by the same job, and
scored by the same code.

- ``diffusion``: full attention, the masked diffusion ELBO (LLaDA / MDLM);
- ``block``: block-causal attention, block diffusion (BD3-LM), blocks of ``block_size``;
- ``autoregressive``: causal attention, the next-token loss;
- ``embedding``: full attention, Gaussian noise on the token embeddings (embedding diffusion),
  sampled by an ODE at each of several step counts (the steps-versus-validity curve).

Held-out bits/token is the training job's held-out figure: the NELBO (an upper bound on the NLL)
for the diffusion objectives (VDM's continuous-time bound for embedding diffusion), the exact NLL
for the autoregressive one (so a gap in the diffusion objectives' disfavour is partly the bound's
looseness). Generation is measured per sampler on the
built-in corpus's held-out prompts (validity per family by the exact checker), or on any other
corpus from an empty context, as a user sees it: answers per second and seconds per answer (text
in, text out, batches of the same prompts for every row), answer tokens per second (up to and
including the EOS, never the EOS filling the canvas after it), model calls per answer and the
answer tokens committed per call, per family. Pure torch and matplotlib: ``jobs/compare.py`` runs
the training.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dlm_ray.config.schema import ModelConfig, PretrainConfig, SampleConfig
from dlm_ray.data.corpus import HELDOUT_SEED, check_answer, take_examples
from dlm_ray.core.inference import Completion, complete_texts
from dlm_ray.core.kinds import kind_of_model
from dlm_ray.eval.scoring import sample_for_family

OBJECTIVES = ("diffusion", "block", "autoregressive", "embedding")


def objective_config(cfg: PretrainConfig, objective: str, *, block_size: int) -> PretrainConfig:
    """``cfg`` with the model kind of ``objective`` and a run name of its own; all else equal."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    attention = {"diffusion": "full", "block": "block_causal", "autoregressive": "causal", "embedding": "full"}[objective]
    model = ModelConfig.model_validate({**cfg.model.model_dump(exclude={"preset"}), "attention": attention,
                                        "block_size": block_size,
                                        "noise": "gaussian" if objective == "embedding" else "mask"})
    return PretrainConfig.model_validate({**cfg.model_dump(), "model": model.model_dump(),
                                          "run_name": f"{cfg.run_name}-{objective}"})


# The dual cache's refresh for full attention (a full forward every this many steps of a block;
# None: only at the block's first step), chosen by measurement (docs/comparison.md).
DUAL_REFRESH: int | None = None


def samplers(objective: str, base: SampleConfig, fast_threshold: float | None,
             entropy_bounds: tuple[float, ...] = (), ode_steps: tuple[int, ...] = ()) -> dict[str, SampleConfig]:
    """The samplers an objective is measured with. Every one stops a row at its EOS, so no
    objective pays for positions after the answer. Diffusion models also run the fast settings:
    commit every position above the confidence threshold (at least one per call), or the most
    confident positions while their summed entropy stays within each bound (the EB-sampler); for
    full attention these run with the dual cache too (a block's steps recompute the block alone;
    block diffusion always runs its exact cache). An autoregressive model writes one token per
    call against its KV cache whatever the setting. An embedding-diffusion model runs its ODE with
    ``base``'s steps and with each of ``ode_steps`` (at most ``base.gen_length``)."""
    plain = base.model_copy(update={"stop_at_eos": True})
    if objective == "embedding":
        steps = sorted({base.steps, *ode_steps})
        return {f"ode {n} steps": plain.model_copy(update={"steps": n, "block_length": base.gen_length})
                for n in steps}
    out = {"reference" if objective != "autoregressive" else "greedy": plain}
    if objective == "autoregressive":
        return out
    fast = {}
    if fast_threshold is not None:
        fast[f"threshold {fast_threshold:g}"] = plain.model_copy(update={"threshold": fast_threshold})
    for bound in entropy_bounds:
        fast[f"entropy {bound:g}"] = plain.model_copy(update={"entropy_bound": bound})
    for name, sc in fast.items():
        if objective == "diffusion" and name.startswith("threshold"):
            out[name] = sc  # the threshold without a cache too: what the cache costs in validity
        if objective == "diffusion":
            out[f"{name}, dual"] = sc.model_copy(update={"cache": "dual", "refresh_every": DUAL_REFRESH})
        else:
            out[name] = sc
    return out


@dataclass
class Speed:
    """What a user waits for, summed over the answers of one sampler (one family or all).

    An answer's tokens are those up to and including its EOS (the canvas positions filled with EOS
    after it are not answer tokens, so a sampler that stops early is not flattered); its model
    calls are those of the ``generate`` call that made it (one call serves its whole batch)."""

    answers: int = 0
    seconds: float = 0.0
    answer_tokens: int = 0
    calls: int = 0

    def add(self, other: Speed) -> Speed:
        return Speed(self.answers + other.answers, self.seconds + other.seconds,
                     self.answer_tokens + other.answer_tokens, self.calls + other.calls)

    @property
    def answers_per_s(self) -> float:
        return self.answers / self.seconds if self.seconds else 0.0

    @property
    def seconds_per_answer(self) -> float:
        return self.seconds / self.answers if self.answers else 0.0

    @property
    def answer_tokens_per_s(self) -> float:
        return self.answer_tokens / self.seconds if self.seconds else 0.0

    @property
    def calls_per_answer(self) -> float:
        return self.calls / self.answers if self.answers else 0.0

    @property
    def tokens_per_call(self) -> float:
        """Answer tokens committed per model call, per row: how parallel the decoding was."""
        return self.answer_tokens / self.calls if self.calls else 0.0


def answer_tokens(c: Completion) -> int:
    """The tokens of a completion up to and including its EOS (none when the length ran out)."""
    return len(c.ids) + int(c.finished)


@dataclass
class Row:
    """One line of the table: an objective with one sampler. ``tokens_per_call`` is per family (or
    ``"all"`` for a corpus without families)."""

    objective: str
    sampler: str
    batch: int  # prompts per generate() call
    heldout_bits: float | None
    train_tokens_per_s: float | None
    answers_per_s: float
    seconds_per_answer: float
    answer_tokens_per_s: float
    calls_per_answer: float
    tokens_per_call: dict[str, float] = field(default_factory=dict)
    validity: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, objective: str, sampler: str, batch: int, heldout_bits: float | None, train_tps: float | None,
           measured: Generation) -> Row:
        total = measured.total
        return cls(objective, sampler, batch, heldout_bits, train_tps, total.answers_per_s, total.seconds_per_answer,
                   total.answer_tokens_per_s, total.calls_per_answer,
                   {f: s.tokens_per_call for f, s in measured.speed.items()}, dict(measured.validity))


@dataclass
class Generation:
    """One sampler's measurement: speed per family (``"all"`` without families) and validity."""

    speed: dict[str, Speed]
    validity: dict[str, float]

    @property
    def total(self) -> Speed:
        out = Speed()
        for s in self.speed.values():
            out = out.add(s)
        return out


@torch.no_grad()
def measure_generation(model: Any, tok: Any, cfg: SampleConfig, *, families: list[str] | None, num_prompts: int,
                       batch_size: int) -> Generation:
    """Speed and validity of one sampler. With ``families`` (the built-in corpus) ``num_prompts``
    held-out prompts of each, ``cfg`` lengthened where a family's answers need it
    (``scoring.sample_for_family``); without, as many unconditional samples (from EOS alone) at temperature >= 1.
    Every family's prompts go through in batches of ``batch_size``, timed end to end (text in,
    text out)."""
    kind = kind_of_model(model)
    jobs = [(fam, take_examples({fam: 1.0}, num_prompts, seed=HELDOUT_SEED, split="heldout", family=fam))
            for fam in families] if families else [(None, None)]
    first = kind.resolve(cfg)
    # One untimed call first: the first calls of a process pay one-off costs (allocator, kernels).
    complete_texts(model, tok, [""] * min(batch_size, 8), first, list(range(min(batch_size, 8))),
                   batch_size=batch_size)
    speed: dict[str, Speed] = {}
    validity: dict[str, float] = {}
    for fam, examples in jobs:
        run = kind.resolve(sample_for_family(cfg, fam) if fam else cfg)
        prompts = [e.prompt for e in examples] if examples else [""] * num_prompts
        if not examples:
            run = run.model_copy(update={"temperature": max(run.temperature, 1.0)})
        t0 = time.perf_counter()
        comps = complete_texts(model, tok, prompts, run, [HELDOUT_SEED + i for i in range(len(prompts))],
                               batch_size=batch_size)
        seconds = time.perf_counter() - t0
        speed[fam or "all"] = Speed(len(comps), seconds, sum(answer_tokens(c) for c in comps),
                                    sum(c.num_model_calls for c in comps))
        if examples:
            validity[fam] = sum(check_answer(e.prompt, c.text) for e, c in zip(examples, comps)) / len(comps)
    return Generation(speed, validity)


def train_tokens_per_s(history: list[dict[str, Any]]) -> float | None:
    """The median of the run's logged training throughput, the first window (start-up) left out."""
    rates = sorted(r["tokens_per_s"] for r in history[1:] if r.get("tokens_per_s"))
    return rates[len(rates) // 2] if rates else None


def table(rows: list[Row]) -> str:
    """The comparison as aligned text, one line per objective and sampler, then the tokens each
    model call committed, per family. ``vs AR``: answers/s over the autoregressive row's at the same
    batch, same run."""
    fams = sorted({f for r in rows for f in r.validity})
    ar = {r.batch: r.answers_per_s for r in rows if r.objective == "autoregressive"}
    head = (f"{'objective':15s} {'sampler':22s} {'batch':>5s} {'bits/token':>10s} "
            + " ".join(f"{f:>9s}" for f in fams)
            + f" {'train tok/s':>11s} {'answers/s':>9s} {'ms/answer':>9s} {'answer tok/s':>12s} "
            + f"{'calls/answer':>12s}" + (f" {'vs AR':>6s}" if ar else ""))
    lines = [head]
    for r in rows:
        bits = f"{r.heldout_bits:10.3f}" if r.heldout_bits is not None else f"{'-':>10s}"
        train = f"{r.train_tokens_per_s:11.0f}" if r.train_tokens_per_s else f"{'-':>11s}"
        vs = f" {r.answers_per_s / ar[r.batch]:5.2f}x" if r.batch in ar else (f" {'-':>6s}" if ar else "")
        lines.append(f"{r.objective:15s} {r.sampler:22s} {r.batch:5d} {bits} "
                     + " ".join(f"{r.validity.get(f, float('nan')):9.0%}" for f in fams)
                     + f" {train} {r.answers_per_s:9.0f} {1e3 * r.seconds_per_answer:9.2f} "
                     + f"{r.answer_tokens_per_s:12.0f} {r.calls_per_answer:12.1f}"
                     + vs)
    per = sorted({f for r in rows for f in r.tokens_per_call})
    lines += ["", f"{'answer tokens per model call':44s} " + " ".join(f"{f:>9s}" for f in per)]
    for r in rows:
        lines.append(f"{r.objective:15s} {r.sampler:22s} {r.batch:5d} " + " ".join(
            f"{r.tokens_per_call.get(f, float('nan')):9.2f}" for f in per))
    return "\n".join(lines)


def rows_as_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def plot(rows: list[Row], out: Any) -> None:
    """A PNG of grouped bars: validity per family, held-out bits/token, and answers per second."""
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
    axes[k + 1].bar(list(x), [r.answers_per_s for r in rows], color="tab:purple")
    axes[k + 1].set_ylabel("answers per second (higher is faster)")
    for ax in axes[k:]:
        ax.set_xticks(list(x), labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
