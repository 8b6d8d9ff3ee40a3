"""Text in, text out: the one path from prompts to completions.

    completions = complete_texts(model, tok, ["q1...32....23.3..="], cfg, seeds=[0])

``encode_prompt`` turns a prompt into ids (after EOS, the document separator the model saw in
training) and refuses a prompt whose ids hold the mask or pad token. ``encode_chat`` does the same
for OpenAI-style ``messages``, rendered with the tokenizer's own chat template as Hugging Face
renders it (Jinja2, sandboxed, ``add_generation_prompt``). ``complete_ids`` runs
``sampling.generate_many`` (rows grouped by settings and length, a seed per row, proposals limited
to the tokenizer's vocabulary) and cuts each completion at its first EOS. Evaluation, batch
generation, Serve and the benchmarks all go through here, so a prompt is completed the same way
everywhere. No Ray, no transport.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dlm_ray.config import ModelConfig, SampleConfig
from dlm_ray.batching import generate_many, trim_after_eos
from dlm_ray.sampling import ModelFn
from dlm_ray.tokenizer import ByteTokenizer, HFTokenizer

Tok = ByteTokenizer | HFTokenizer


class PromptError(ValueError):
    """A prompt that cannot be completed; the message says why."""


@dataclass
class Completion:
    text: str
    ids: list[int]  # up to (not including) the first EOS
    num_generated: int  # positions the sampler filled, EOS padding included
    num_model_calls: int  # of the generate() call that made it (one call serves its whole batch)

    @property
    def finished(self) -> bool:
        """The model ended the answer (an EOS) before the generation length ran out."""
        return len(self.ids) < self.num_generated


def finish(tok: Tok, generated: list[int], num_model_calls: int) -> Completion:
    """The generated ids of one row (EOS padding included) as a completion: cut at the first EOS,
    decoded."""
    ids = trim_after_eos(generated, tok.end_ids)
    return Completion(tok.decode(ids), ids, len(generated), num_model_calls)


def encode_prompt(tok: Tok, text: str, *, prepend_eos: bool = True) -> list[int]:
    """The ids of a prompt; a prompt that is not valid Unicode (a lone surrogate) or that encodes to
    the mask or pad token is refused."""
    _check_text(text, "the prompt")
    ids = tok.encode(text)
    bad = {tok.mask_id, tok.pad_id}.intersection(ids)
    if bad:
        raise PromptError(f"the prompt encodes to the tokenizer's {'mask' if tok.mask_id in bad else 'pad'} token "
                          f"(id {min(bad)}), which no content may hold")
    return [tok.eos_id, *ids] if prepend_eos else ids


def sampler_for(model_cfg: ModelConfig | None, cfg: SampleConfig) -> SampleConfig:
    """``cfg`` as a model of this shape runs it: a block-causal model samples in its own blocks (the
    length rounded up to whole blocks, about the same tokens per step) with its exact cache; a
    full-attention model takes ``cfg`` as it is; an autoregressive one writes one token per call
    (``steps`` = ``gen_length``, one block), and diffusion-only settings are refused. Batch generation,
    Serve and evaluation apply it."""
    if model_cfg is not None and model_cfg.attention == "causal":
        from dlm_ray.autoregressive import check_settings

        check_settings(cfg)
        return cfg.model_copy(update={"steps": cfg.gen_length, "block_length": cfg.gen_length, "refresh_every": None})
    if model_cfg is None or model_cfg.attention != "block_causal":
        return cfg
    if cfg.cache in ("prefix", "dual"):
        raise ValueError(f"cache={cfg.cache!r} is for full-attention models; this block-causal model uses its "
                         "exact block cache")
    size = model_cfg.block_size
    gen = -(-cfg.gen_length // size) * size
    per_step = max(1, round(cfg.gen_length / cfg.steps))
    steps = max(1, size // per_step) * (gen // size)
    cache = "none" if cfg.cfg_scale else "blocks"  # guidance needs a second, uncached pass
    return cfg.model_copy(update={"gen_length": gen, "block_length": size, "steps": steps, "cache": cache,
                                  "refresh_every": None})


CHAT_ROLES = ("system", "user", "assistant")


def encode_chat(tok: Tok, messages: Any) -> list[int]:
    """The ids of a conversation, ready for the assistant's answer. Messages are ``{"role",
    "content"}`` dicts; their text may not hold the tokenizer's special-token markup (it would be read
    as markup, not text), and a tokenizer without a chat template is refused, not guessed for."""
    if not tok.chat_template:
        raise PromptError("the model's tokenizer has no chat template; send a plain prompt instead")
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            raise PromptError(f"messages[{k}] must be an object with role and content")
        if m.get("role") not in CHAT_ROLES:
            raise PromptError(f"messages[{k}].role is {m.get('role')!r}; expected one of {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise PromptError(f"messages[{k}].content must be a string")
        _check_text(content, f"messages[{k}].content")
        markup = next((t for t in tok.special_tokens if t in content), None)
        if markup is not None:
            raise PromptError(f"messages[{k}].content holds the special token text {markup!r}")
    try:
        text = _template(tok.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=_special(tok, "bos_token"),
            eos_token=_special(tok, "eos_token"))
    except Exception as exc:  # noqa: BLE001 - a template's own raise_exception, or a bad template
        raise PromptError(f"the chat template refused these messages: {exc}") from None
    ids = tok.encode_chat(text)
    if tok.mask_id in ids:
        raise PromptError("the rendered conversation holds the mask token")
    return ids


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(f"{where} is not valid Unicode ({exc.reason} at character {exc.start})") from None


def _special(tok: Tok, key: str) -> str:
    value = getattr(tok, "config", {}).get(key, "")
    return value.get("content", "") if isinstance(value, dict) else (value or "")


@functools.lru_cache(maxsize=8)
def _template(source: str) -> Any:
    """A compiled chat template, in the environment Hugging Face renders templates in."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def complete_ids(model: ModelFn, tok: Tok, prompt_ids: Sequence[list[int]], samples: SampleConfig | Sequence[SampleConfig],
                 seeds: Sequence[int], *, batch_size: int = 64, device: torch.device | str = "cpu",
                 suffixes: Sequence[list[int]] | None = None) -> list[Completion]:
    """One completion per prompt (ids from ``encode_prompt``), with its own settings and seed; with
    ``suffixes`` (ids, empty for none) each is inserted before its row's suffix."""
    if len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
    per_row = [samples] * len(prompt_ids) if isinstance(samples, SampleConfig) else list(samples)
    results = generate_many(model, list(prompt_ids), per_row, seeds=list(seeds), batch_size=batch_size,
                            pad_id=tok.pad_id, mask_id=tok.mask_id, eos_id=tok.eos_id, device=device,
                            vocab_size=tok.vocab_size, end_ids=tok.end_ids,
                            suffixes=None if suffixes is None else list(suffixes))
    return [finish(tok, gen, calls) for gen, calls in results]


def complete_texts(model: ModelFn, tok: Tok, prompts: Sequence[str], cfg: SampleConfig | Sequence[SampleConfig],
                   seeds: Sequence[int], *, batch_size: int = 64, device: torch.device | str = "cpu",
                   prepend_eos: bool = True) -> list[Completion]:
    """Text → ids → ``generate`` → text, a seed per prompt: a completion does not depend on the
    other prompts it is batched with."""
    ids = [encode_prompt(tok, p, prepend_eos=prepend_eos) for p in prompts]
    return complete_ids(model, tok, ids, cfg, seeds, batch_size=batch_size, device=device)
