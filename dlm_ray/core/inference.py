"""Text in, text out: the one path from prompts to completions.

    completions = complete_texts(model, tok, ["q1...32....23.3..="], cfg, seeds=[0])

``encode_prompt`` turns a prompt into ids (after EOS, the document separator the model saw in
training) and refuses a prompt whose ids hold the mask or pad token. ``encode_chat`` does the same
for OpenAI-style ``messages``, rendered with the tokenizer's own chat template as Hugging Face
renders it (``dlm_ray.core.chat_template``; ``tools`` and a template's own variables as keywords).
``complete_ids`` runs ``sampling.generate_many`` (rows grouped by settings and length, a seed per
row, proposals limited to the tokenizer's vocabulary) and cuts each completion at its first EOS.
Evaluation, batch generation, Serve and the benchmarks all go through here, so a prompt is completed
the same way everywhere. No Ray, no transport.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dlm_ray.core.chat_template import render, template_variables
from dlm_ray.config.schema import ModelConfig, SampleConfig
from dlm_ray.core.batching import generate_many, trim_after_eos
from dlm_ray.core.sampling import ModelFn
from dlm_ray.core.tokenizer import ByteTokenizer, HFTokenizer

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
        from dlm_ray.core.autoregressive import check_settings

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


def render_chat(tok: Tok, messages: Any, *, add_generation_prompt: bool = True, tools: Any = None,
                **template_kwargs: Any) -> str:
    """A conversation as the text of the tokenizer's chat template, rendered as Hugging Face renders it
    (``dlm_ray.core.chat_template``). Messages are ``{"role", "content"}`` dicts; ``tools`` (JSON schemas) and
    ``template_kwargs`` (e.g. a template's ``date_string``) reach the template as variables. No text a
    caller gives may hold the tokenizer's special-token markup (it would be read as markup, not text),
    and a tokenizer without a chat template is refused, not guessed for."""
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
        _check_markup(tok, content, f"messages[{k}].content")
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise PromptError(f"messages[{k}].name must be a string")
            _check_markup(tok, m["name"], f"messages[{k}].name")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise PromptError("tools must be a list of objects (JSON schemas)")
        _check_markup(tok, _json_text(tools, "tools"), "tools")
    for key, value in template_kwargs.items():
        _check_markup(tok, _json_text(value, f"the template variable {key!r}"), f"the template variable {key!r}")
    try:
        return render(tok.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      variables=template_variables(getattr(tok, "config", {})), tools=tools, **template_kwargs)
    except Exception as exc:  # noqa: BLE001 - a template's own raise_exception, or a bad template
        raise PromptError(f"the chat template refused these messages: {exc}") from None


def encode_chat(tok: Tok, messages: Any, *, add_generation_prompt: bool = True, tools: Any = None,
                **template_kwargs: Any) -> list[int]:
    """The ids of a conversation (``render_chat``), by default ready for the assistant's answer; the
    template's markup becomes special tokens, as ``apply_chat_template(tokenize=True)`` makes it."""
    text = render_chat(tok, messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs)
    ids = tok.encode_chat(text)
    if tok.mask_id in ids:
        raise PromptError("the rendered conversation holds the mask token")
    return ids


def _check_markup(tok: Tok, text: str, where: str) -> None:
    _check_text(text, where)
    markup = next((t for t in tok.special_tokens if t in text), None)
    if markup is not None:
        raise PromptError(f"{where} holds the special token text {markup!r}")


def _json_text(value: Any, where: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{where} must be JSON data: {exc}") from None


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(f"{where} is not valid Unicode ({exc.reason} at character {exc.start})") from None


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
