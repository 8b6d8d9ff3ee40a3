"""Supervised fine-tuning data (LLaDA's recipe): one example per row, the prompt never masked.

A row is ``prompt ids + response ids (+ the end-of-turn token) + EOS up to seq_len``. The EOS
padding is part of the answer: it is masked and trained like the response, which is how the model
learns where an answer stops. ``prompt_len`` marks the positions the forward process leaves alone
(``diffusion.mask_rows(prompt_len_R=...)``), and ``answer_len`` (seq_len - prompt_len) normalises
each row's loss, as LLaDA's SFT loss does.

An example is a record with ``messages`` (OpenAI's format; the last message is the assistant's
answer, the ones before it are rendered with the tokenizer's chat template) or ``prompt`` and
``response`` (the prompt encoded as generation encodes it, after EOS). The built-in corpus gives
its task as the prompt and the answer as the response. A record that cannot be used yields a
reason (counted by the pipeline, or raised under ``strict``), never a silent drop. No Ray here.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np

from dlm_ray.config.schema import DataConfig
from dlm_ray.core.text import PromptError, encode_chat, encode_prompt
from dlm_ray.data.corpus import example_at, is_heldout
from dlm_ray.data.hashing import stable_id
from dlm_ray.data.sources import in_val, iter_jsonl_records, iter_table_records

Record = tuple[str, "dict[str, Any] | None", "str | None"]  # (where, record, reason it is unusable)


class ExampleError(ValueError):
    """An example that cannot be trained on; ``reason`` is the counter's name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def iter_records(item: dict[str, Any], cfg: DataConfig) -> Iterator[Record]:
    """The examples of one work item that belong to its split."""
    if item["format"] == "builtin":
        c = cfg.corpus
        for index in range(item["start"], item["stop"]):
            ex = example_at(c.families, index, seed=c.seed)
            if is_heldout(ex.text) == (item["split"] == "val"):
                yield f"example {index}", {cfg.prompt_column: ex.prompt, cfg.response_column: ex.answer}, None
        return
    hashed = item.get("holdout") == "hash" and cfg.val_fraction > 0
    for where, record, reason in _raw_records(item, cfg):
        if hashed:
            key = json.dumps(record, sort_keys=True, default=str) if record is not None else where
            if record is None and item["split"] == "val":
                continue  # bad rows are counted once, by the train split
            if record is not None and in_val(key, cfg.val_fraction) != (item["split"] == "val"):
                continue
        yield where, record, reason


def _raw_records(item: dict[str, Any], cfg: DataConfig) -> Iterator[Record]:
    fmt, uri = item["format"], item["path"]
    columns = [cfg.prompt_column, cfg.response_column, cfg.messages_column]
    if fmt == "jsonl":
        for r in iter_jsonl_records(uri):
            yield r.where, None if r.record is None else {k: r.record[k] for k in columns if k in r.record}, r.reason
    elif fmt in ("parquet", "arrow"):
        for where, record in iter_table_records(fmt, uri, columns):
            yield where, record, None
    else:
        raise OSError(f"fine-tuning reads JSONL, Parquet or Hugging Face records, not {fmt} files")


def encode_example(tok: Any, record: dict[str, Any], cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids including the end-of-turn token of a chat) of one example."""
    messages = record.get(cfg.messages_column)
    try:
        if messages is not None:
            if not isinstance(messages, list) or len(messages) < 2 or not isinstance(messages[-1], dict) \
                    or messages[-1].get("role") != "assistant":
                raise ExampleError("bad_messages", "messages must end with the assistant's answer after at "
                                                   "least one other message")
            prompt = encode_chat(tok, messages[:-1])
            answer = messages[-1].get("content")
            end = tok.end_ids[1:2]  # the end-of-turn token closes a chat answer (EOS padding follows)
        else:
            prompt_text, answer = record.get(cfg.prompt_column), record.get(cfg.response_column)
            if not isinstance(prompt_text, str) or not prompt_text.strip():
                raise ExampleError("missing_prompt", f"{cfg.prompt_column!r} is missing or empty (and no "
                                                     f"{cfg.messages_column!r})")
            prompt, end = encode_prompt(tok, prompt_text), ()
    except PromptError as exc:
        raise ExampleError("bad_prompt", str(exc)) from None
    if not isinstance(answer, str) or not answer:
        raise ExampleError("missing_response", "the response is missing or empty")
    response = tok.encode(answer)
    # Never the mask; nor pad, unless pad is EOS (LLaDA), which is what the answer is padded with.
    if ({tok.mask_id} | ({tok.pad_id} - {tok.eos_id})) & set(response):
        raise ExampleError("special_token", "the response encodes to the mask or pad token")
    return prompt, [*response, *end]


def build_rows(examples: list[tuple[list[int], list[int]]], *, seq_len: int, eos_id: int, key: str,
               first_index: int) -> dict[str, np.ndarray]:
    """Rows of ``examples`` (each fits: prompt + response + at least one EOS <= seq_len), numbered
    from ``first_index`` within their work item."""
    R = len(examples)
    ids = np.full((R, seq_len), eos_id, dtype=np.int32)
    prompt_len = np.zeros(R, dtype=np.int32)
    for r, (prompt, response) in enumerate(examples):
        if len(prompt) + len(response) >= seq_len:
            raise ValueError(f"example {first_index + r}: {len(prompt) + len(response)} tokens leave no room "
                             f"for EOS in seq_len {seq_len}")
        ids[r, :len(prompt)] = prompt
        ids[r, len(prompt):len(prompt) + len(response)] = response
        prompt_len[r] = len(prompt)
    index = np.arange(first_index, first_index + R, dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((R, seq_len), dtype=np.int8),
            "prompt_len": prompt_len, "answer_len": (seq_len - prompt_len).astype(np.int32),
            "row_id": np.asarray([stable_id(key, int(i)) for i in index], dtype=np.int64), "row_index": index}
