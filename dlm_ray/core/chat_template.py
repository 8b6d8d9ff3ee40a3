"""Chat templates, rendered with jinja2 alone exactly as Hugging Face's ``apply_chat_template`` renders them.

    text = render(source, messages, add_generation_prompt=True, variables=template_variables(config), tools=tools)

A model's chat template is a Jinja program written against the environment ``transformers`` gives it,
so rendering it anywhere else must give that environment, or the model sees a prompt it was never
trained on. What a template can rely on:

- a sandbox (templates come from model repositories, i.e. from strangers): attributes starting with
  an underscore and mutating methods of lists and dicts are refused;
- ``trim_blocks`` and ``lstrip_blocks`` on, the ``loopcontrols`` extension (``{% break %}``,
  ``{% continue %}``);
- ``tojson`` that writes JSON as ``json.dumps`` does: no HTML escaping, keys in the caller's order,
  non-ASCII kept, with ``indent``, ``separators``, ``sort_keys`` and ``ensure_ascii`` options (Jinja's
  own filter escapes ``<>&'`` and sorts keys, which changes tool schemas);
- ``strftime_now(format)``: the local time now, formatted (Llama 3.x templates print today's date);
- ``raise_exception(message)``: a template's way of refusing a conversation;
- ``{% generation %} ... {% endgeneration %}``: marks the assistant's own text for training masks;
  rendering it renders its body;
- the variables ``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (``None`` when not
  given, so ``tools is defined`` holds as it does there), every special token the tokenizer names
  (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``, ... and model-specific ones such as
  ``image_token``), and any extra keyword a caller passes (which wins over a special token of the same
  name).

Messages are passed with their ``None``-valued keys dropped, as ``transformers`` does, since templates
test a key's presence (``'name' in message``) more often than its value.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Mapping, Sequence

# The named special tokens of a Hugging Face tokenizer, each a template variable when the tokenizer sets it.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def template_variables(config: Mapping[str, Any]) -> dict[str, str]:
    """The special-token variables a template sees, from a ``tokenizer_config.json``: the named ones
    the file sets, model-specific ones (any other string-valued ``*_token`` key, and the names of an
    ``extra_special_tokens`` object). A token may be written as its text or as an AddedToken object."""
    def text_of(value: Any) -> str | None:
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            return value["content"]
        return None

    out: dict[str, str] = {}
    for key, value in config.items():
        if key in NAMED_SPECIAL_TOKENS or key.endswith("_token"):
            text = text_of(value)
            if text is not None:
                out[key] = text
    # The older name of the same field, read when the newer one is absent.
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
    if isinstance(extra, dict):
        for key, value in extra.items():
            text = text_of(value)
            if isinstance(key, str) and text is not None:
                out[key] = text
    return out


def render(source: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
           variables: Mapping[str, Any] | None = None, tools: Sequence[Mapping[str, Any]] | None = None,
           documents: Sequence[Mapping[str, Any]] | None = None, **template_kwargs: Any) -> str:
    """``source`` rendered for one conversation. ``variables`` are the tokenizer's special tokens
    (``template_variables``); ``template_kwargs`` are further variables, and win over them."""
    context = {**(variables or {}), **template_kwargs}
    context.update(
        messages=[{k: v for k, v in m.items() if v is not None} for m in messages],
        tools=None if tools is None else [dict(t) for t in tools],
        documents=None if documents is None else [dict(d) for d in documents],
        add_generation_prompt=add_generation_prompt,
    )
    return compile_template(source).render(**context)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """``source`` compiled in the environment described above (cached: a server renders one template
    for every request)."""
    return _environment().from_string(source)


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_extension()])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # A plain str, not Markup: Markup would HTML-escape whatever text a template adds to it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates call it with
    return datetime.now().strftime(format)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@functools.lru_cache(maxsize=1)
def _generation_extension() -> type:
    """The ``{% generation %}`` tag: its body is rendered in a call block (its own scope, as a macro's
    body is), and the block's output is the body's output."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller: Any) -> str:
            return caller()

    return GenerationBlock
