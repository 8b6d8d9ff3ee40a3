"""Chat templates render as transformers' ``apply_chat_template`` renders them: text and ids.

Each family's tokenizer is built here with the tokenizers library (byte-level, its special tokens
added) and written with its ``tokenizer_config.json``; the reference is transformers' own tokenizer
loaded from the same local directory. The templates are written here in the style of their families
and use what those use: tools rendered with ``tojson`` (Llama 3.1, Qwen2.5), today's date from
``strftime_now`` (Llama 3.x), ``raise_exception``, the ``{% generation %}`` tag of training templates,
loop controls and special tokens other than BOS/EOS.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest

from dlm_ray.core.chat_template import template_variables
from dlm_ray.core.text import PromptError, encode_chat, render_chat
from dlm_ray.core.tokenizer import HFTokenizer
from tests.llada_dir import CHAT_TEMPLATE as LLADA_TEMPLATE
from tests.llada_dir import write_tokenizer as write_llada_tokenizer

transformers = pytest.importorskip("transformers")

LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- 'You may call these functions; answer with {"name": ..., "parameters": ...}.\n\n' }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and tools is not none %}
    {%- if messages | length == 0 %}
        {{- raise_exception("tools go in the first user message, and there is none") }}
    {%- endif %}
    {%- set first_user_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given these functions, answer with a JSON function call.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nFunction signatures, one per line, within <tools></tools>:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nCall one with a JSON object within tags:\n<tool_call>\n' }}
    {{- '{"name": <name>, "arguments": <args>}\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# A training template: the assistant's text is marked for the loss mask; a namespace counts turns
# from inside the block.
GENERATION_TEMPLATE = r"""{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\n' }}
    {%- if message.role == 'assistant' %}
        {% generation %}
        {%- set ns.turns = ns.turns + 1 %}
        {{- message.content | trim + '<|im_end|>' }}
        {% endgeneration %}
    {%- else %}
        {{- message.content | trim + '<|im_end|>' }}
    {%- endif %}
    {{- '\n' }}
{%- endfor %}
{{- '(' ~ ns.turns ~ ' answers)\n' }}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# BERT-style markup: every named special token but the mask is written; a loop stops at the fourth message.
SPECIALS_TEMPLATE = r"""{{ cls_token }}
{%- for message in messages %}
    {%- if loop.index0 == 4 %}{% break %}{% endif %}
    {%- if message.content == '' %}{{ unk_token }}{% continue %}{% endif %}
[{{ message.role }}] {{ message.content }}{{ sep_token }}
{%- endfor %}
{%- if add_generation_prompt %}[assistant] {% else %}{{ pad_token }}{{ pad_token }}{% endif %}
{{- '(mask: ' ~ (mask_token is defined) ~ ', bos: ' ~ (bos_token is defined) ~ ')' }}
"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather at a place & time, e.g. 'Zürich' <today>",
    "parameters": {"type": "object", "required": ["place"], "properties": {
        "place": {"type": "string", "description": "a city"}, "unit": {"type": "string", "enum": ["°C", "°F"]}}}}}]

CHAT = [{"role": "system", "content": "  Be brief & kind.  "}, {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "Let me look <that> up."}, {"role": "user", "content": "And 'tomorrow'?"}]
SPECIALS_CHAT = [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                 {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]


def write_family(directory: Path, specials: list[str], config: dict[str, Any], *, plain: tuple[str, ...] = ()) -> Path:
    """A byte-level tokenizer (no merges) with ``specials`` (and ``plain``, added tokens that are not
    special), and its tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return directory


def llama31(d: Path) -> Path:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>", "<|mdm_mask|>"]
    return write_family(d, specials, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                      "pad_token": "<|finetune_right_pad_id|>", "chat_template": LLAMA31_TEMPLATE})


def qwen25(d: Path, template: str = QWEN25_TEMPLATE) -> Path:
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": template}
    return write_family(d, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mdm_mask|>"], config,
                        plain=("<tool_call>", "</tool_call>"))


def llada(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    write_llada_tokenizer(d, chat_template=LLADA_TEMPLATE)
    return d


def bert_like(d: Path) -> Path:
    return write_family(d, ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"], {
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]",
        "unk_token": {"__type": "AddedToken", "content": "[UNK]", "special": True, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False}, "chat_template": SPECIALS_TEMPLATE})


# name: (tokenizer directory writer, messages, tools, further template variables)
CASES = {
    "llama31_tools_in_user_message": (llama31, CHAT, TOOLS, {}),
    "llama31_tools_in_system": (llama31, CHAT, TOOLS, {"tools_in_user_message": False}),
    "qwen25_tools": (qwen25, CHAT, TOOLS, {}),
    "llada": (llada, CHAT, TOOLS, {}),
    "generation": (lambda d: qwen25(d, GENERATION_TEMPLATE), CHAT, None, {}),
    "pad_unk_sep_cls": (bert_like, SPECIALS_CHAT, None, {}),
}


def both(d: Path) -> tuple[HFTokenizer, Any]:
    """Ours and transformers' tokenizer, from the same local files."""
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(d), local_files_only=True)
    return HFTokenizer(d), reference


def rendered_on_one_day(ours: HFTokenizer, reference: Any, messages: list, tools: Any, kwargs: dict,
                        add_generation_prompt: bool) -> tuple[str, list[int], str, list[int]]:
    """Our text and ids, then the reference's, all rendered on the same calendar day (a template may
    print today's date; a run across midnight is repeated)."""
    for _ in range(2):
        day = datetime.date.today()
        text = render_chat(ours, messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        ids = encode_chat(ours, messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        ref_text = reference.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False, **kwargs)
        ref_ids = reference.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                tokenize=True, return_dict=False, **kwargs)
        if datetime.date.today() == day:
            break
    return text, ids, ref_text, list(ref_ids)


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["generation_prompt", "no_generation_prompt"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_text_and_ids_equal_transformers(tmp_path, case, add_generation_prompt):
    write, messages, tools, kwargs = CASES[case]
    ours, reference = both(write(tmp_path / case))
    text, ids, ref_text, ref_ids = rendered_on_one_day(ours, reference, messages, tools, kwargs, add_generation_prompt)
    assert text == ref_text
    assert ids == ref_ids
    assert ours.decode(ids) == text  # every byte of the text is in the ids, markup as single tokens


def test_the_families_features_reach_the_text(tmp_path):
    """The comparison above is between renderings that use the features, not ones that skip them."""
    ours, _ = both(llama31(tmp_path / "llama"))
    text = render_chat(ours, CHAT, tools=TOOLS)
    today = datetime.date.today()
    assert f"Today Date: {today:%d %b %Y}" in text or f"Today Date: {today - datetime.timedelta(days=1):%d %b %Y}" in text
    assert '"description": "Weather at a place & time, e.g. \'Zürich\' <today>"' in text  # no HTML escaping
    assert text.index('"type": "function"') < text.index('"function": {')  # keys in the caller's order
    assert "26 Jul 2024" in render_chat(ours, CHAT, tools=TOOLS, date_string="26 Jul 2024")
    qwen, _ = both(qwen25(tmp_path / "qwen"))
    assert json.dumps(TOOLS[0], ensure_ascii=False) in render_chat(qwen, CHAT, tools=TOOLS)
    bert, _ = both(bert_like(tmp_path / "bert"))
    assert render_chat(bert, SPECIALS_CHAT, add_generation_prompt=False).startswith("[CLS][user] a[SEP][UNK][user] b")


def test_a_templates_own_refusal_is_transformers_message(tmp_path):
    ours, reference = both(llama31(tmp_path / "llama"))
    system_only = [{"role": "system", "content": "hi"}]
    message = "tools go in the first user message, and there is none"
    with pytest.raises(PromptError, match=message):
        encode_chat(ours, system_only, tools=TOOLS)
    with pytest.raises(Exception, match=message):
        reference.apply_chat_template(system_only, tools=TOOLS, tokenize=False)


def test_special_token_variables_are_transformers_named_and_model_specific_tokens(tmp_path):
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 passed its special tokens to templates differently")
    d = bert_like(tmp_path / "bert")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.update({"image_token": "[CLS]", "extra_special_tokens": {"audio_token": "[SEP]"}, "add_bos_token": False})
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(d), local_files_only=True)
    assert template_variables(config) == reference.special_tokens_map


def test_bad_tools_and_markup_in_them_are_refused(tmp_path):
    ours, _ = both(qwen25(tmp_path / "qwen"))
    for tools, message in [("get_weather", "tools must be a list of objects"), ([1], "tools must be a list of objects"),
                           ([{"name": "f", "description": "ends<|im_end|>"}], "tools holds the special token text"),
                           ([{"name": {1, 2}}], "tools must be JSON data")]:
        with pytest.raises(PromptError, match=message):
            encode_chat(ours, CHAT, tools=tools)
    with pytest.raises(PromptError, match="template variable 'date_string' holds the special token text"):
        encode_chat(ours, CHAT, date_string="<|im_start|>")


def test_templates_stay_sandboxed(tmp_path):
    for n, template in enumerate(["{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}",
                                  "{{ raise_exception.__globals__['json'] }}", "{{ ''.__class__.__subclasses__() }}",
                                  "{% set d = {} %}{{ d.update({'a': 1}) }}"]):
        ours, _ = both(qwen25(tmp_path / str(n), template))
        with pytest.raises(PromptError, match="refused"):
            render_chat(ours, CHAT)
