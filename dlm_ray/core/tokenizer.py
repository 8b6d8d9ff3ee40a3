"""Tokenizers: a built-in byte-level one (the default) and a loader for any HF ``tokenizer.json``.

Both expose the same small surface (``encode``, ``decode``, ``vocab_size``, ``pad_id``, ``eos_id``,
``mask_id``) so the rest of the package never asks which one it has. ``mask_id`` is the one
canonical mask id: the data pipeline, the loss and the samplers all take it from here.

A masked diffusion model needs a mask token that the tokenizer never produces from text; the HF
loader adds ``<|mask|>`` at the first free id when the file has none (every autoregressive
tokenizer; ``mask_added`` says so, and ``save`` records it in both tokenizer files), and pad/EOS
likewise, always offline from a local path, and encodes
text with special-token matching off, so a document holding the literal text ``<|mdm_mask|>`` (or
``[MASK]``, ``<pad>``, ...) is encoded as ordinary text, never as the mask or pad id.

``decode`` never drops a token silently: special tokens are written out as their text, and an id
outside the vocabulary is an error.

An instruct model ends its answer with an end-of-turn token (LLaDA: ``<|eot_id|>``) and pads with
EOS; ``end_ids`` holds every id that ends an answer. A model's own ids (a LLaDA config.json's
``mask_token_id`` / ``eos_token_id`` / ``pad_token_id``, where pad and EOS are one token) are passed
in as ``ids`` and win over the lookup by name; ids a model's config leaves out are looked up by the
names ``tokenizer_config.json`` gives, then by the usual names, and a pad missing everywhere is
EOS (as an autoregressive model pads). ``chat_template`` is the Jinja template of
``tokenizer_config.json``, if the tokenizer has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

MASK_CANDIDATES = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")
MASK_TOKEN = "<|mask|>"  # added where a tokenizer has none (Dream's and dllm's A2D models' name for it)
EOS_CANDIDATES = ("<|endoftext|>", "<|eot_id|>", "</s>", "<eos>", "[SEP]")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")


EOT_TOKEN = "<|eot_id|>"
TOKENIZER_CONFIG = "tokenizer_config.json"


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int
    mask_id: int
    end_ids: tuple[int, ...]
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...
    def decode(self, ids: list[int]) -> str: ...
    def to_config(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, then pad, EOS and mask. Needs no file and no download."""

    SPECIAL_TEXT = {256: "<|pad|>", 257: "<|endoftext|>", 258: "<|mdm_mask|>"}

    def __init__(self) -> None:
        self.pad_id, self.eos_id, self.mask_id = 256, 257, 258
        self.vocab_size = 259
        self.end_ids = (self.eos_id,)
        self.chat_template: str | None = None
        self.special_tokens: dict[str, str] = {}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Bytes as UTF-8 (a cut multi-byte character becomes U+FFFD), special ids as their names."""
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            if i not in self.SPECIAL_TEXT:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary of {self.vocab_size}")
            out.append(run.decode("utf-8", errors="replace") + self.SPECIAL_TEXT[i])
            run = bytearray()
        return "".join(out) + run.decode("utf-8", errors="replace")

    def to_config(self) -> dict[str, Any]:
        return {"kind": "byte"}


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json``, with pad/EOS/mask guaranteed."""

    def __init__(self, path: str | Path, *, ids: dict[str, int] | None = None) -> None:
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self.path = path
        self._tok = _Tok.from_file(str(path))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.config: dict[str, Any] = {}
        if (path.parent / TOKENIZER_CONFIG).is_file():
            self.config = json.loads((path.parent / TOKENIZER_CONFIG).read_text())
        self.chat_template = self.config.get("chat_template") if isinstance(self.config.get("chat_template"), str) else None
        self.mask_added = False
        self.mask_id = self._resolve("mask_id", ids, vocab, MASK_CANDIDATES, add=MASK_TOKEN)
        self.eos_id = self._resolve("eos_id", ids, vocab, EOS_CANDIDATES, add=EOS_CANDIDATES[0])
        # A model's own ids without a pad (autoregressive models have none): it pads with EOS.
        self.pad_id = self._resolve("pad_id", ids, vocab, PAD_CANDIDATES,
                                    add=None if ids is not None else PAD_CANDIDATES[0], fallback=self.eos_id)
        self._finish(vocab)

    def _resolve(self, key: str, ids: dict[str, int] | None, vocab: dict[str, int], candidates: tuple[str, ...], *,
                 add: str | None, fallback: int | None = None) -> int:
        """``ids[key]`` (checked to be a token), else the token tokenizer_config.json names, else the
        first of ``candidates`` found, else ``fallback``, else ``add`` added at the first free id."""
        from tokenizers import AddedToken

        if ids is not None and key in ids:
            size = self._tok.get_vocab_size(with_added_tokens=True)
            if not 0 <= ids[key] < size or self._tok.id_to_token(ids[key]) is None:
                raise ValueError(f"{self.path}: the model's {key} {ids.get(key)} is not a token of this tokenizer "
                                 f"({size} ids); a diffusion model needs its mask token in the tokenizer")
            return ids[key]
        # A model's tokenizer (ids given) names its own specials; otherwise the usual names decide.
        named = self.config.get(key.replace("_id", "_token")) if ids is not None else None
        named = named.get("content") if isinstance(named, dict) else named
        for token in ((named,) if isinstance(named, str) else ()) + candidates:
            if token in vocab:
                return vocab[token]
        if fallback is not None and add is None:
            return fallback
        self._tok.add_special_tokens([AddedToken(add, special=True, normalized=False)])
        vocab.update(self._tok.get_vocab(with_added_tokens=True))
        self.mask_added = self.mask_added or key == "mask_id"
        return vocab[add]

    def _finish(self, vocab: dict[str, int]) -> None:
        from tokenizers import Tokenizer as _Tok

        if self.mask_id in (self.eos_id, self.pad_id):
            raise ValueError(f"{self.path}: the mask token must differ from pad and EOS")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eot = vocab.get(EOT_TOKEN)
        self.end_ids = (self.eos_id,) + ((eot,) if eot is not None and eot != self.eos_id else ())
        added = self._tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: t.content for t in added.values() if t.special}
        # Text is text: "<|mdm_mask|>" written in a document must not become the mask id. Rendered chat
        # templates are the exception: their markup is special tokens (encode_chat).
        self._specials = _Tok.from_str(self._tok.to_str()) if self.chat_template else None
        self._tok.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # The Rust tokenizer encodes a batch on several threads.
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_chat(self, rendered: str) -> list[int]:
        """Ids of a rendered chat template, its special-token markup recognised as such. Callers
        check that message contents hold no special-token text (``text.encode_chat``)."""
        if self._specials is None:
            raise ValueError(f"{self.path}: the tokenizer has no chat template")
        return self._specials.encode(rendered, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary of {self.vocab_size} ({self.path})")
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer (with the tokens added here) and its tokenizer_config.json (naming an
        added mask token as the mask token), so a checkpoint is self-contained."""
        out = Path(directory) / "tokenizer.json"
        self._tok.save(str(out))
        config = dict(self.config)
        if self.mask_added:  # transformers' tokenizers then know it as their mask token too
            config = {"tokenizer_class": "PreTrainedTokenizerFast", **config, "mask_token": MASK_TOKEN}
            if isinstance(config.get("added_tokens_decoder"), dict):
                config["added_tokens_decoder"] = {**config["added_tokens_decoder"], str(self.mask_id): {
                    "content": MASK_TOKEN, "lstrip": False, "normalized": False, "rstrip": False,
                    "single_word": False, "special": True}}
        if config:
            (Path(directory) / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return out

    def to_config(self) -> dict[str, Any]:
        return {"kind": "hf", "path": str(self.path)}


def load_tokenizer(spec: str | dict[str, Any]) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` or a path (file or directory) to a ``tokenizer.json``; or a ``to_config()`` dict."""
    if isinstance(spec, dict):
        if spec.get("kind") == "byte":
            return ByteTokenizer()
        if spec.get("kind") == "hf" and "path" in spec:
            return HFTokenizer(spec["path"], ids=spec.get("ids"))
        raise ValueError(f"unrecognised tokenizer config {json.dumps(spec)}")
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)

