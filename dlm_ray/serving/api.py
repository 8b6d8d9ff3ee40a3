"""The OpenAI-style wire format of the Serve app: requests, settings, errors, response bodies.

``CompletionRequest`` (``/v1/completions``) and ``ChatCompletionRequest`` (``/v1/chat/completions``)
share the sampling fields: OpenAI's (``max_tokens``, ``temperature``, ``n``, ``seed``, ``stop``,
``stream``) and the diffusion sampler's own, which OpenAI clients pass through ``extra_body``.
Types are strict and numbers finite and bounded, so a bad value is a 400 before anything runs. The
sampler's fields are ``config_inference.SampleOverrides``, the ones a batch-generation row may set:
the same setting is refused in both with the same message.
Every error answers ``{"error": {"message", "type", "param", "code"}}``.

Chat streams follow OpenAI's chunk format: each chunk's ``delta.content`` is the text that became
final since the last chunk (the answer's prefix with no mask left in it), so a client that joins the
deltas gets the answer; ``canvas`` carries the whole sharpening canvas for clients that show it.
"""

# No `from __future__ import annotations`: FastAPI reads the models' types at runtime.
import json
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from dlm_ray.config.schema import SampleConfig
from dlm_ray.config.inference import MAX_INT, SampleOverrides, describe_errors, resolve_overrides

MASK_GLYPH = "_"


class SamplingFields(SampleOverrides):
    """The fields every generation request has: OpenAI's we honour, plus the sampler's own
    (``temperature``, ``seed`` and the diffusion settings, which OpenAI clients pass through
    extra_body), checked as a batch row's are."""

    model: str
    max_tokens: int | None = Field(None, gt=0, le=MAX_INT)  # → gen_length; the context bounds it further
    n: int = Field(1, gt=0, le=MAX_INT)
    stop: str | list[str] | None = None
    stream: bool = False
    user: str | None = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``. With ``suffix`` the completion is inserted between prompt and suffix."""

    prompt: str | list[str]
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, gt=0, le=MAX_INT)  # OpenAI's newer name for max_tokens


def resolve_sample(req: SamplingFields, default: SampleConfig) -> SampleConfig:
    """The request's settings over the server's; block and step counts follow max_tokens when the
    request leaves them out (steps keep the default's tokens-per-step ratio). A ValueError says what
    does not fit together, in the words a batch row gets."""
    gen = req.max_tokens or getattr(req, "max_completion_tokens", None) or default.gen_length
    block = req.block_length or (default.block_length if gen % default.block_length == 0 else gen)
    steps = req.steps
    if steps is None and gen % block == 0:
        blocks = gen // block
        steps = max(1, round(gen * default.steps / default.gen_length / blocks)) * blocks
    given = req.model_dump(include=set(SampleOverrides.model_fields), exclude_none=True)
    return resolve_overrides(default, {**given, "gen_length": gen, "block_length": block, "steps": steps or gen})


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop sequence, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


app = FastAPI(title="dlm-ray")


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    # A field's error in the words a batch row with the same bad setting gets.
    message = "; ".join(describe_errors([e], skip=("body",)) if any(p != "body" for p in e["loc"])
                        else f"body: {e['msg']}" for e in exc.errors()[:5])
    return _error(400, message, param=where or None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every HTTP error in one body: ours, and the router's 404 (unknown path) and 405 (wrong method)."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    if exc.status_code == 404 and str(exc.detail).startswith("model "):
        code = "model_not_found"
    return _error(exc.status_code, str(exc.detail), code=code)




# ------------------------------------------------------------------------------------------ bodies


def text_body(rid: str, model: str, answers: list[tuple[str, str, Any]], *, prompt_tokens: int, seed: int) -> dict:
    """``/v1/completions``' body; ``answers`` are (text, finish reason, Completion) per choice."""
    # model_calls: of the generate() batch that made this choice (a call serves the whole batch).
    choices = [{"index": k, "text": text, "logprobs": None, "finish_reason": reason, "model_calls": c.num_model_calls}
               for k, (text, reason, c) in enumerate(answers)]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "seed": seed, "usage": _usage(prompt_tokens, answers)}


def chat_body(rid: str, model: str, answers: list[tuple[str, str, Any]], *, prompt_tokens: int, seed: int) -> dict:
    """``/v1/chat/completions``' body."""
    choices = [{"index": k, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason, "model_calls": c.num_model_calls}
               for k, (text, reason, c) in enumerate(answers)]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "seed": seed, "usage": _usage(prompt_tokens, answers)}


def _usage(prompt_tokens: int, answers: list[tuple[str, str, Any]]) -> dict[str, int]:
    completion = sum(len(c.ids) for _, _, c in answers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def text_event(rid: str, model: str, text: str, finish_reason: str | None, **progress: int) -> str:
    """One Server-Sent Event of a ``/v1/completions`` stream: the whole canvas as it stands."""
    return "data: " + json.dumps({"id": rid, "object": "text_completion", "model": model,
                                  "choices": [{"index": 0, "text": text, "finish_reason": finish_reason,
                                               "logprobs": None}], **progress}) + "\n\n"


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish_reason: str | None, **extra: Any) -> str:
    """One ``chat.completion.chunk`` event."""
    return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                                  "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                               "finish_reason": finish_reason}], **extra}) + "\n\n"


class StreamText:
    """The part of a streamed answer that can no longer change, each piece sent once: the generated
    prefix before the first mask (and before the end token), less a cut-off character or the start of
    a stop sequence that later tokens could complete."""

    def __init__(self, tok: Any, stops: list[str]) -> None:
        self.tok, self.stops, self.sent = tok, [s for s in stops if s], ""

    def delta(self, gen_ids: list[int]) -> str:
        prefix = []
        for t in gen_ids:
            if t == self.tok.mask_id or t in self.tok.end_ids:
                break
            prefix.append(t)
        text, stopped = cut_at_stop(self.tok.decode(prefix), self.stops)
        if not stopped:
            text = text.rstrip("\ufffd")  # a character whose remaining bytes are still masked
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        return self._take(text)

    def rest(self, final_text: str) -> str:
        """What is left of the final answer."""
        return self._take(final_text)

    def _take(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""  # never resend: the hold-backs above keep what was sent a prefix of the answer
        delta, self.sent = text[len(self.sent):], text
        return delta
