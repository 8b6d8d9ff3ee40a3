"""Ray Serve: the denoiser behind an OpenAI-style completions API, batched and autoscaled.

    serve run jobs/serve.yaml                                   # or, in Python:
    serve.run(build_app({"checkpoint": "runs/tiny/export"}))

One deployment holds the model (loaded once per replica) and the FastAPI ingress. Requests (each
prompt × n is one item) meet in ``@serve.batch``; a batch is split into groups with equal sampler
settings, and each group is one ``generate`` call with a seed per row, so a completion does not
depend on what it was batched with. ``stream: true`` sends the canvas as Server-Sent Events after
every denoising step: the text sharpens in place, masks shown as ``MASK_GLYPH``. Streams are batched
with each other the same way (one model call per step serves every stream of the batch), and a
stream whose client disconnects stops at the next step.

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
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from dlm_ray.checkpoint import inference_placement, load_inference
from dlm_ray.config import MAX_CFG_SCALE, SampleConfig, ServeConfig
from dlm_ray.inference import Completion, PromptError, complete_ids, encode_prompt, finish
from dlm_ray.sampling import generate_rows

MASK_GLYPH = "_"
MAX_INT = 2**31 - 1  # no integer setting comes near it; larger ones would overflow tensor sizes


class CompletionRequest(BaseModel):
    """``POST /v1/completions``: OpenAI's fields we honour, plus the sampler's own."""

    # Strict types: no "yes" for a flag, no true for a number, no "3" for an integer; numbers finite.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(None, gt=0, le=MAX_INT)  # → gen_length; the context bounds it further
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)  # OpenAI's range
    n: int = Field(1, gt=0, le=MAX_INT)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    user: str | None = None
    # Diffusion sampling (OpenAI clients pass these through extra_body); SampleConfig bounds them.
    steps: int | None = Field(None, gt=0, le=MAX_INT)
    block_length: int | None = Field(None, gt=0, le=MAX_INT)
    remasking: Literal["low_confidence", "random"] | None = None
    cfg_scale: float | None = Field(None, ge=0, le=MAX_CFG_SCALE, allow_inf_nan=False)
    threshold: float | None = Field(None, gt=0, le=2, allow_inf_nan=False)
    factor: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
    cache: Literal["none", "prefix", "dual"] | None = None


@dataclass
class Item:
    """One completion to make: a tokenized prompt, its settings and seed."""

    prompt_ids: list[int]
    sample: SampleConfig
    seed: int


@dataclass
class Stream:
    """One streaming request: its item, the queue its events go to (on the replica's event loop),
    and whether its client is gone (set from the event loop, read by the sampling thread)."""

    item: Item
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    gone: threading.Event = field(default_factory=threading.Event)

    def send(self, msg: tuple) -> None:
        """From the sampling thread: hand an event to the request's coroutine."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, msg)


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


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every HTTP error in one body: ours, and the router's 404 (unknown path) and 405 (wrong method)."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    if exc.status_code == 404 and str(exc.detail).startswith("model "):
        code = "model_not_found"
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
        self.stream_batch_sizes: Counter[int] = Counter()
        self.stream_model_calls = 0  # model calls made for streams (a dropped stream's stop adding to it)
        self.active_streams = 0
        self._stream_tasks: set[asyncio.Future] = set()
        self.created = int(time.time())
        # Which replica answers /v1/stats: each keeps its own counts, and a load spreads over several.
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._model_lock = threading.Lock()  # streams and batches take turns on the model
        self.complete_batch.set_max_batch_size(c.max_batch_size)
        self.complete_batch.set_batch_wait_timeout_s(c.batch_wait_timeout_s)
        self.stream_batch.set_max_batch_size(c.max_batch_size)
        self.stream_batch.set_batch_wait_timeout_s(c.batch_wait_timeout_s)

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
        """How requests were batched on this replica ({batch size: number of batches}, for completions
        and for streams), the model calls streams made, and the streams now open."""
        return {"replica": self.replica, "batch_sizes": dict(sorted(self.batch_sizes.items())),
                "max_batch_size": self.cfg.max_batch_size,
                "stream_batch_sizes": dict(sorted(self.stream_batch_sizes.items())),
                "stream_model_calls": self.stream_model_calls, "active_streams": self.active_streams}

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
            self.active_streams += 1
            return StreamingResponse(self._stream(rid, items[0], stops), media_type="text/event-stream")
        outs = await asyncio.gather(*(self.complete_batch(it) for it in items))
        failed = next((o for o in outs if isinstance(o, Exception)), None)
        if failed is not None:
            status = 400 if isinstance(failed, ValueError) else 500
            raise HTTPException(status, f"this request failed while sampling: {failed}")
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
    async def complete_batch(self, items: list[Item]) -> list[Completion | Exception]:
        self.batch_sizes[len(items)] += 1
        # In a thread, so the replica keeps answering health checks and queueing requests meanwhile.
        return await asyncio.to_thread(self._run_batch, items)

    def _run_batch(self, items: list[Item]) -> list[Completion | Exception]:
        """The batch in one go; if it fails, each item alone, so an item that fails answers with its
        own error and the others are still answered."""
        with self._model_lock:
            try:
                return list(self._complete(items))
            except Exception:  # noqa: BLE001 - isolated below, item by item
                if len(items) == 1:
                    raise
            out: list[Completion | Exception] = []
            for it in items:
                try:
                    out += self._complete([it])
                except Exception as exc:  # noqa: BLE001 - answered to that request alone
                    out.append(exc)
            return out

    def _complete(self, items: list[Item]) -> list[Completion]:
        return complete_ids(self.model, self.tok, [it.prompt_ids for it in items], [it.sample for it in items],
                            [it.seed for it in items], batch_size=len(items), device=self.device)

    # ------------------------------------------------------------------------------- streaming

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def stream_batch(self, streams: list[Stream]) -> list[None]:
        """Streams that arrive together share their model calls, as completions do; each gets its
        own events. Returns when every stream of the batch is finished or gone."""
        self.stream_batch_sizes[len(streams)] += 1
        await asyncio.to_thread(self._run_streams, streams)
        return [None] * len(streams)

    def _run_streams(self, streams: list[Stream]) -> None:
        groups: dict[str, list[Stream]] = {}
        for st in streams:
            groups.setdefault(st.item.sample.model_dump_json(), []).append(st)
        for group in groups.values():
            if all(st.gone.is_set() for st in group):
                continue
            gen_length = group[0].item.sample.gen_length

            def on_step(i: int, x_BT: torch.Tensor, group: list[Stream] = group,
                        gen_length: int = gen_length) -> torch.Tensor:
                self.stream_model_calls += 1
                canvas = x_BT[:, -gen_length:].tolist()
                for st, row in zip(group, canvas):
                    if not st.gone.is_set():
                        st.send(("step", i, row))
                # A client that went away stops its row now: no more model calls for it.
                return torch.tensor([st.gone.is_set() for st in group], device=x_BT.device)

            try:
                with self._model_lock:
                    gen, _ = generate_rows(self.model, [st.item.prompt_ids for st in group], group[0].item.sample,
                                           seeds=[st.item.seed for st in group], pad_id=self.tok.pad_id,
                                           mask_id=self.tok.mask_id, eos_id=self.tok.eos_id, device=self.device,
                                           on_step=on_step, vocab_size=self.tok.vocab_size, end_ids=self.tok.end_ids)
            except Exception as exc:  # noqa: BLE001 - each stream of the group answers with the error
                for st in group:
                    st.send(("error", exc))
                continue
            for st, ids in zip(group, gen):
                st.send(("done", ids))

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
        stream = Stream(item, asyncio.Queue(), asyncio.get_running_loop())
        # The batch runs on its own: it outlives this request if the client goes, for the others in it.
        batch = asyncio.ensure_future(self.stream_batch(stream))
        self._stream_tasks.add(batch)
        batch.add_done_callback(self._stream_tasks.discard)

        def event(text: str, step: int, gen_ids: list[int], finish: str | None) -> str:
            masked = sum(t == self.tok.mask_id for t in gen_ids)
            return "data: " + json.dumps({
                "id": rid, "object": "text_completion", "model": self.cfg.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "step": step, "num_masked": masked, "num_unmasked": len(gen_ids) - masked}) + "\n\n"

        try:
            while True:
                kind, *msg = await stream.events.get()
                if kind == "step":
                    i, gen_ids = msg
                    yield event(self.render(gen_ids), i, gen_ids, None)
                    continue
                if kind == "error":
                    body = {"error": {"message": f"this request failed while sampling: {msg[0]}",
                                      "type": "server_error", "param": None, "code": None}}
                    yield "data: " + json.dumps(body) + "\n\n"
                    break
                (final_ids,) = msg
                done = finish(self.tok, final_ids, 0)
                text, stopped = cut_at_stop(done.text, stops)
                reason = "stop" if stopped or done.finished else "length"
                yield event(text, item.sample.steps, final_ids, reason)
                break
            yield "data: [DONE]\n\n"
        finally:
            # Finished, or the client went away (the generator is cancelled): either way its row
            # stops at the next step. The batch goes on for the other streams in it.
            stream.gone.set()
            self.active_streams = max(0, self.active_streams - 1)

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
