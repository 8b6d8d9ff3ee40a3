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

``/v1/chat/completions`` takes OpenAI's ``messages``, rendered with the model's own chat template
(a model without one answers 400), and streams OpenAI's chunks (``serve_api``). The wire format
(request models, errors: 400 for a bad request, 404 for an unknown model) lives in ``serve_api``.
Beyond ``max_queued_requests`` Serve answers 503 at once instead of queueing without bound.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types at runtime.
import asyncio
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch
from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from ray import serve

from dlm_ray.core.batching import generate_rows
from dlm_ray.io.checkpoint import inference_placement, load_inference
from dlm_ray.config.schema import SampleConfig
from dlm_ray.config.inference import ServeConfig
from dlm_ray.core.inference import Completion, complete_ids, finish
from dlm_ray.core.kinds import kind_of
from dlm_ray.core.text import PromptError, encode_chat, encode_prompt
from dlm_ray.serving.api import (MASK_GLYPH, ChatCompletionRequest, CompletionRequest, SamplingFields, StreamText, app,
                               chat_body, chat_chunk, cut_at_stop, resolve_sample, text_body, text_event)

# How long Serve's health probe waits for a generation to free the model: well within Serve's
# health-check timeout (30 s by default), beyond which a replica is restarted.
HEALTH_WAIT_S = 10.0


@dataclass
class Item:
    """One completion to make: a tokenized prompt, its settings and seed (and a suffix to fill up to)."""

    prompt_ids: list[int]
    sample: SampleConfig
    seed: int
    suffix_ids: list[int] = field(default_factory=list)


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


@serve.deployment
@serve.ingress(app)
class DenoiserServer:
    """A replica: the model, the tokenizer and the batch queue."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = c = ServeConfig.model_validate(cfg)
        self.device, dtype = inference_placement(c.num_gpus > 0, c.dtype, c.torch_threads or int(c.num_cpus))
        self.model, self.tok, self.meta = load_inference(c.checkpoint, device=self.device, dtype=dtype,
                                                           compile=c.compile, kind=c.model_kind)
        self.kind = kind_of(self.model.config)  # what this model can run, decided once
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
        self._check_model(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise HTTPException(400, "prompt is an empty list")
        if len(prompts) > self.cfg.max_prompts:
            raise HTTPException(400, f"{len(prompts)} prompts; at most {self.cfg.max_prompts} per request")
        for k, p in enumerate(prompts):
            if not p.strip():
                raise HTTPException(400, f"prompt {k} is empty")
        suffix: list[int] = []
        if req.suffix:
            try:
                self.kind.check_infill()
            except ValueError as exc:
                raise HTTPException(400, f"suffix: {self.cfg.model_name!r} cannot take one: {exc}") from None
        try:
            ids = [encode_prompt(self.tok, p) for p in prompts]
            if req.suffix:
                suffix = encode_prompt(self.tok, req.suffix, prepend_eos=False)
        except PromptError as exc:
            raise HTTPException(400, str(exc)) from None
        return await self._answer(req, ids, chat=False, suffix=suffix)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest) -> Any:
        self._check_model(req)
        try:
            ids = [encode_chat(self.tok, [m.model_dump(exclude_none=True) for m in req.messages])]
        except PromptError as exc:
            raise HTTPException(400, str(exc)) from None
        return await self._answer(req, ids, chat=True)

    def _check_model(self, req: SamplingFields) -> None:
        if req.model != self.cfg.model_name:
            raise HTTPException(404, f"model {req.model!r} is not served here; GET /v1/models lists "
                                     f"{self.cfg.model_name!r}")

    async def _answer(self, req: SamplingFields, ids: list[list[int]], *, chat: bool,
                      suffix: list[int] | None = None) -> Any:
        """Sample for the tokenized prompts of a request (each followed by ``suffix`` if given: the
        answer fills the gap); the body (or stream) in its API's shape."""
        suffix = suffix or []
        try:
            sample = self.kind.resolve(resolve_sample(req, self.cfg.sample))
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if req.n > self.cfg.max_n:
            raise HTTPException(400, f"n={req.n}; at most {self.cfg.max_n}")
        if len(stops) > 4:
            raise HTTPException(400, "at most 4 stop sequences")
        if req.stream and (len(ids) > 1 or req.n > 1):
            raise HTTPException(400, "stream supports one prompt and n=1")
        for k, p in enumerate(ids):
            if len(p) + sample.gen_length + len(suffix) > self.max_seq_len:
                what = "the conversation" if chat else f"prompt {k}"
                tail = f" and a suffix of {len(suffix)} tokens" if suffix else ""
                raise HTTPException(400, f"{what} is {len(p)} tokens; with max_tokens {sample.gen_length}{tail} that "
                                         f"exceeds the model's context of {self.max_seq_len}")
        base_seed = req.seed if req.seed is not None else secrets.randbits(62)
        items = [Item(p, sample, base_seed + k * req.n + j, suffix) for k, p in enumerate(ids) for j in range(req.n)]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        if req.stream:
            return StreamingResponse(self._stream(rid, items[0], stops, chat), media_type="text/event-stream")
        outs = await asyncio.gather(*(self.complete_batch(it) for it in items))
        failed = next((o for o in outs if isinstance(o, Exception)), None)
        if failed is not None:
            status = 400 if isinstance(failed, ValueError) else 500
            raise HTTPException(status, f"this request failed while sampling: {failed}")
        answers = []
        for c in outs:
            text, stopped = cut_at_stop(c.text, stops)
            answers.append((text, "stop" if stopped or c.finished else "length", c))
        build = chat_body if chat else text_body
        return build(rid, self.cfg.model_name, answers, prompt_tokens=sum(len(p) for p in ids) * req.n, seed=base_seed)

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
                            [it.seed for it in items], batch_size=len(items), device=self.device,
                            suffixes=[it.suffix_ids for it in items])

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
            tail = max(len(st.item.suffix_ids) for st in group)  # the suffixes' padded width

            def on_step(i: int, x_BT: torch.Tensor, group: list[Stream] = group,
                        gen_length: int = gen_length, tail: int = tail) -> torch.Tensor:
                self.stream_model_calls += 1
                end = x_BT.shape[1] - tail
                canvas = x_BT[:, end - gen_length:end].tolist()
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
                                           on_step=on_step, vocab_size=self.tok.vocab_size, end_ids=self.tok.end_ids,
                                           suffixes=[st.item.suffix_ids for st in group])
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

    async def _stream(self, rid: str, item: Item, stops: list[str], chat: bool) -> AsyncIterator[str]:
        stream = Stream(item, asyncio.Queue(), asyncio.get_running_loop())
        # The batch runs on its own: it outlives this request if the client goes, for the others in it.
        batch = asyncio.ensure_future(self.stream_batch(stream))
        self._stream_tasks.add(batch)
        batch.add_done_callback(self._stream_tasks.discard)
        name, answer = self.cfg.model_name, StreamText(self.tok, stops)

        def event(step: int, gen_ids: list[int], final: str | None, finish_reason: str | None) -> str:
            masked = sum(t == self.tok.mask_id for t in gen_ids)
            progress = {"step": step, "num_masked": masked, "num_unmasked": len(gen_ids) - masked}
            if not chat:
                return text_event(rid, name, final if final is not None else self.render(gen_ids), finish_reason,
                                  **progress)
            delta = answer.rest(final) if final is not None else answer.delta(gen_ids)
            return chat_chunk(rid, name, {"content": delta}, finish_reason, canvas=self.render(gen_ids), **progress)

        # Counted here, where the ``finally`` below is sure to uncount it (nothing awaits in between):
        # a client that leaves before the response starts never starts this generator, and then
        # neither runs. Counted where the response is made, it stayed counted for good.
        self.active_streams += 1
        try:
            if chat:
                yield chat_chunk(rid, name, {"role": "assistant", "content": ""}, None)
            while True:
                kind, *msg = await stream.events.get()
                if kind == "step":
                    yield event(msg[0], msg[1], None, None)
                    continue
                if kind == "error":
                    body = {"error": {"message": f"this request failed while sampling: {msg[0]}",
                                      "type": "server_error", "param": None, "code": None}}
                    yield "data: " + json.dumps(body) + "\n\n"
                    break
                (final_ids,) = msg
                done = finish(self.tok, final_ids, 0)
                text, stopped = cut_at_stop(done.text, stops)
                yield event(item.sample.steps, final_ids, text, "stop" if stopped or done.finished else "length")
                break
            yield "data: [DONE]\n\n"
        finally:
            # Finished, or the client went away (the generator is cancelled): either way its row
            # stops at the next step. The batch goes on for the other streams in it.
            stream.gone.set()
            self.active_streams -= 1

    def check_health(self) -> None:
        """Serve's periodic probe (in a worker thread): the model answers a one-token call with finite
        logits. It holds the model lock as sampling does, so it never runs beside a generation (two
        calls at once would contend for the device's memory, and a compiled model must not be entered
        from two threads). A generation in progress is waited for, up to ``HEALTH_WAIT_S``; one that
        holds the model longer is itself the sign that the replica works, and waiting on would outlast
        Serve's own health-check timeout and get a working replica restarted."""
        if not self._model_lock.acquire(timeout=HEALTH_WAIT_S):
            return
        try:
            with torch.no_grad():
                logits = self.kind.probe(self.model, torch.tensor([[self.tok.eos_id]], device=self.device))
        finally:
            self._model_lock.release()
        if not torch.isfinite(logits).all():
            raise RuntimeError("the model's logits are not finite")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``serve run`` (YAML ``import_path: dlm_ray.serving.app:build_app``)."""
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
