"""Ray Serve: the denoiser behind an OpenAI-style completions API, batched and autoscaled.

    serve run jobs/serve.yaml                                   # or, in Python:
    serve.run(build_app({"checkpoint": "runs/tiny/export"}))

One deployment holds the model (loaded once per replica) and the FastAPI ingress. Requests (each
prompt × n is one item) meet in ``@serve.batch``; a batch is split into groups with equal sampler
settings, and each group is one ``generate`` call with a seed per row, so a completion does not
depend on what it was batched with. ``stream: true`` sends the canvas as Server-Sent Events after
every denoising step: the text sharpens in place, masks shown as ``MASK_GLYPH``.

Errors answer in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
request (types, ranges, lengths, malformed JSON), 404 for an unknown model. Beyond
``max_queued_requests`` Serve answers 503 at once instead of queueing without bound.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types at runtime.
import asyncio
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from dlm_ray.checkpoint import inference_placement, load_inference
from dlm_ray.config import SampleConfig, ServeConfig
from dlm_ray.inference import Completion, PromptError, complete_ids, encode_prompt
from dlm_ray.sampling import generate_rows, trim_after_eos

MASK_GLYPH = "_"


class CompletionRequest(BaseModel):
    """``POST /v1/completions``: OpenAI's fields we honour, plus the sampler's own."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(None, gt=0)  # → gen_length
    temperature: float | None = Field(None, ge=0)
    n: int = Field(1, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    user: str | None = None
    # Diffusion sampling (OpenAI clients pass these through extra_body).
    steps: int | None = Field(None, gt=0)
    block_length: int | None = Field(None, gt=0)
    remasking: Literal["low_confidence", "random"] | None = None
    cfg_scale: float | None = Field(None, ge=0)
    threshold: float | None = Field(None, gt=0)
    factor: float | None = Field(None, gt=0)
    cache: Literal["none", "prefix", "dual"] | None = None


@dataclass
class Item:
    """One completion to make: a tokenized prompt, its settings and seed."""

    prompt_ids: list[int]
    sample: SampleConfig
    seed: int


def resolve_sample(req: CompletionRequest, default: SampleConfig) -> SampleConfig:
    """The request's settings over the server's; block and step counts follow max_tokens when the
    request leaves them out (steps keep the default's tokens-per-step ratio)."""
    gen = req.max_tokens or default.gen_length
    block = req.block_length or (default.block_length if gen % default.block_length == 0 else gen)
    steps = req.steps
    if steps is None and gen % block == 0:
        blocks = gen // block
        steps = max(1, round(gen * default.steps / default.gen_length / blocks)) * blocks
    fields = {"gen_length": gen, "block_length": block, "steps": steps or gen, "temperature": req.temperature,
              "remasking": req.remasking, "cfg_scale": req.cfg_scale, "threshold": req.threshold, "factor": req.factor,
              "cache": req.cache}
    update = {k: v for k, v in fields.items() if v is not None}
    # A request's fast-decoding rule replaces the server's default rule, whichever that is.
    if req.factor is not None and req.threshold is None:
        update["threshold"] = None
    if req.threshold is not None and req.factor is None:
        update["factor"] = None
    try:
        return SampleConfig.model_validate({**default.to_dict(), **update})
    except ValidationError as exc:
        raise HTTPException(400, "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None


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
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                        for e in exc.errors()[:5])
    return _error(400, message, param=where or None)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = "model_not_found" if exc.status_code == 404 else None
    return _error(exc.status_code, str(exc.detail), code=code)


@serve.deployment
@serve.ingress(app)
class DenoiserServer:
    """A replica: the model, the tokenizer and the batch queue."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = c = ServeConfig.model_validate(cfg)
        self.device, dtype = inference_placement(c.num_gpus > 0, c.dtype, c.torch_threads or int(c.num_cpus))
        self.model, self.tok, self.meta = load_inference(c.checkpoint, device=self.device, dtype=dtype)
        self.max_seq_len = self.model.max_seq_len
        self.batch_sizes: Counter[int] = Counter()
        self.created = int(time.time())
        self._model_lock = threading.Lock()  # streams and batches take turns on the model
        self.complete_batch.set_max_batch_size(c.max_batch_size)
        self.complete_batch.set_batch_wait_timeout_s(c.batch_wait_timeout_s)

    # ---------------------------------------------------------------------------------- routes

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok", "model": self.cfg.model_name}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": self.created,
                                            "owned_by": "dlm-ray", "max_seq_len": self.max_seq_len}]}

    @app.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        """How requests were batched on this replica: {batch size: number of batches}."""
        return {"batch_sizes": dict(sorted(self.batch_sizes.items())), "max_batch_size": self.cfg.max_batch_size}

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> Any:
        if req.model != self.cfg.model_name:
            raise HTTPException(404, f"model {req.model!r} is not served here; GET /v1/models lists "
                                     f"{self.cfg.model_name!r}")
        sample = resolve_sample(req, self.cfg.sample)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        self._check(prompts, req, stops)
        base_seed = req.seed if req.seed is not None else secrets.randbits(62)
        try:
            ids = [encode_prompt(self.tok, p) for p in prompts]
        except PromptError as exc:
            raise HTTPException(400, str(exc)) from None
        for k, p in enumerate(ids):
            if len(p) + sample.gen_length > self.max_seq_len:
                raise HTTPException(400, f"prompt {k} is {len(p)} tokens; with max_tokens {sample.gen_length} that "
                                         f"exceeds the model's context of {self.max_seq_len}")
        items = [Item(p, sample, base_seed + k * req.n + j) for k, p in enumerate(ids) for j in range(req.n)]
        rid = f"cmpl-{secrets.token_hex(12)}"
        if req.stream:
            return StreamingResponse(self._stream(rid, items[0], stops), media_type="text/event-stream")
        outs = await asyncio.gather(*(self.complete_batch(it) for it in items))
        choices, completion_tokens = [], 0
        for index, c in enumerate(outs):
            text, stopped = cut_at_stop(c.text, stops)
            completion_tokens += len(c.ids)
            # model_calls: of the generate() batch that made this choice (a call serves the whole batch).
            choices.append({"index": index, "text": text, "logprobs": None,
                            "finish_reason": "stop" if stopped or c.finished else "length",
                            "model_calls": c.num_model_calls})
        prompt_tokens = sum(len(p) for p in ids) * req.n
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.cfg.model_name,
                "choices": choices, "seed": base_seed,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def _check(self, prompts: list[str], req: CompletionRequest, stops: list[str]) -> None:
        if not prompts:
            raise HTTPException(400, "prompt is an empty list")
        if len(prompts) > self.cfg.max_prompts:
            raise HTTPException(400, f"{len(prompts)} prompts; at most {self.cfg.max_prompts} per request")
        if req.n > self.cfg.max_n:
            raise HTTPException(400, f"n={req.n}; at most {self.cfg.max_n}")
        for k, p in enumerate(prompts):
            if not p.strip():
                raise HTTPException(400, f"prompt {k} is empty")
        if len(stops) > 4:
            raise HTTPException(400, "at most 4 stop sequences")
        if req.stream and (len(prompts) > 1 or req.n > 1):
            raise HTTPException(400, "stream supports one prompt and n=1")

    # ------------------------------------------------------------------------------- sampling

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def complete_batch(self, items: list[Item]) -> list[Completion]:
        self.batch_sizes[len(items)] += 1
        # In a thread, so the replica keeps answering health checks and queueing requests meanwhile.
        return await asyncio.to_thread(self._run_batch, items)

    def _run_batch(self, items: list[Item]) -> list[Completion]:
        with self._model_lock:
            return complete_ids(self.model, self.tok, [it.prompt_ids for it in items], [it.sample for it in items],
                                [it.seed for it in items], batch_size=len(items), device=self.device)

    def _generate(self, items: list[Item], on_step: Any = None) -> tuple[list[list[int]], int]:
        step = None if on_step is None else (lambda i, x: on_step(i, x[0, -items[0].sample.gen_length:].tolist()))
        with self._model_lock:
            return generate_rows(self.model, [it.prompt_ids for it in items], items[0].sample,
                                 seeds=[it.seed for it in items], pad_id=self.tok.pad_id, mask_id=self.tok.mask_id,
                                 eos_id=self.tok.eos_id, device=self.device, on_step=step,
                                 vocab_size=self.tok.vocab_size)

    def render(self, gen_ids: list[int]) -> str:
        """The canvas as text, each still-masked position shown as MASK_GLYPH."""
        parts, run = [], []
        for t in gen_ids:
            if t == self.tok.mask_id:
                parts.append(self.tok.decode(run) + MASK_GLYPH)
                run = []
            else:
                run.append(t)
        return "".join(parts) + self.tok.decode(run)

    async def _stream(self, rid: str, item: Item, stops: list[str]) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_step(i: int, gen_ids: list[int]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (i, gen_ids))

        task = loop.run_in_executor(None, self._generate, [item], on_step)
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))

        def event(text: str, step: int, gen_ids: list[int], finish: str | None) -> str:
            masked = sum(t == self.tok.mask_id for t in gen_ids)
            return "data: " + json.dumps({
                "id": rid, "object": "text_completion", "model": self.cfg.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "step": step, "num_masked": masked, "num_unmasked": len(gen_ids) - masked}) + "\n\n"

        while (msg := await queue.get()) is not None:
            i, gen_ids = msg
            yield event(self.render(gen_ids), i, gen_ids, None)
        (final_ids,), _ = await task
        tokens = trim_after_eos(final_ids, self.tok.eos_id)
        text, stopped = cut_at_stop(self.tok.decode(tokens), stops)
        finish = "stop" if stopped or len(tokens) < len(final_ids) else "length"
        yield event(text, item.sample.steps, final_ids, finish)
        yield "data: [DONE]\n\n"

    def check_health(self) -> None:
        """Serve's periodic probe: the weights are still on the device and the model answers."""
        with torch.no_grad():
            if not self._model_lock.locked():
                self.model(torch.tensor([[self.tok.eos_id]], device=self.device))


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``serve run`` (YAML ``import_path: dlm_ray.serve:build_app``)."""
    cfg = ServeConfig.model_validate(args)
    a = cfg.autoscaling
    autoscaling = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                   "target_ongoing_requests": a.target_ongoing_requests,
                   "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}
    if a.initial_replicas is not None:
        autoscaling["initial_replicas"] = a.initial_replicas
    return DenoiserServer.options(
        autoscaling_config=autoscaling, max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(cfg.to_dict())
