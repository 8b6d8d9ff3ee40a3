"""Text in and out of ids: a plain prompt, or OpenAI-style chat messages, as the ids a model is given.

    ids = encode_prompt(tok, "q1...32....23.3..=")   # [EOS, *prompt ids]
    ids = encode_chat(tok, [{"role": "user", "content": "Hi"}])

``encode_prompt`` puts EOS (the document separator the model saw in training) before a prompt's
ids and refuses a prompt whose ids hold the mask or pad token. ``encode_chat`` does the same for
``messages``, rendered with the tokenizer's own chat template as Hugging Face renders it
(``dlm_ray.core.chat_template``; ``tools`` and a template's own variables as keywords). Any text a
caller gives that cannot be used is a ``PromptError`` naming the field.

Generation, Serve, batch generation and fine-tuning data all encode here, so a prompt means the same
ids everywhere. This module imports the tokenizer and the chat template, never the sampler: data
code that encodes examples does not pull in generation.
"""

from __future__ import annotations

import json
from typing import Any

from dlm_ray.core.chat_template import render, template_variables
from dlm_ray.core.tokenizer import ByteTokenizer, HFTokenizer

Tok = ByteTokenizer | HFTokenizer
CHAT_ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """A prompt that cannot be completed; the message says why."""


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
