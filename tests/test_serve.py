"""The Serve app through real HTTP on localhost: completions, batching, streaming, the OpenAI
client, every bad-input case (4xx, service still up) and a clean 503 over capacity."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
import torch

from dlm_ray.io.checkpoint import load_inference, save_inference
from dlm_ray.config.schema import SampleConfig
from dlm_ray.core.inference import complete_ids
from dlm_ray.core.text import encode_chat
from dlm_ray.core.model import Denoiser
from dlm_ray.core.tokenizer import ByteTokenizer
from tests.llada_dir import write_llada_dir

MODEL = "dlm-test"
CHAT_SAMPLE = {"gen_length": 16, "steps": 8, "block_length": 16}
MAIN_SAMPLE = {"gen_length": 16, "steps": 8, "block_length": 16}  # the main app's defaults


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory) -> str:
    """A model in LLaDA's layout, with a chat template."""
    return str(write_llada_dir(tmp_path_factory.mktemp("chat") / "llada"))


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory, tiny_cfg, chat_ckpt):
    from ray import serve

    from dlm_ray.serving.app import build_app

    torch.manual_seed(0)
    ckpt = save_inference(Denoiser(tiny_cfg).eval(), {"kind": "byte"}, tmp_path_factory.mktemp("serve_ckpt"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"checkpoint": str(ckpt), "model_name": MODEL, "max_batch_size": 16, "batch_wait_timeout_s": 0.05,
            "sample": MAIN_SAMPLE, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    serve.run(build_app(args), name="main", route_prefix="/")
    # A second app that can hold one request at a time and queue one more.
    small = {**args, "max_ongoing_requests": 1, "max_queued_requests": 1, "max_batch_size": 1,
             "sample": {"gen_length": 96, "steps": 96, "block_length": 96}}
    serve.run(build_app(small), name="small", route_prefix="/small")
    # A model big enough that a long stream takes seconds: time for a client to go away mid-way.
    big_cfg = tiny_cfg.model_copy(update={"d_model": 256, "n_layers": 4, "d_mlp": 768, "max_seq_len": 1024})
    big_ckpt = save_inference(Denoiser(big_cfg).eval(), {"kind": "byte"}, tmp_path_factory.mktemp("big_ckpt"))
    big = {**args, "checkpoint": str(big_ckpt), "num_cpus": 0.5,
           "sample": {"gen_length": 768, "steps": 768, "block_length": 768}}
    serve.run(build_app(big), name="big", route_prefix="/big")
    chat = {**args, "checkpoint": chat_ckpt, "sample": CHAT_SAMPLE, "num_cpus": 0.5}
    # A block diffusion model (blocks of 4): served in its own blocks with its exact cache.
    block_cfg = tiny_cfg.model_copy(update={"attention": "block_causal", "block_size": 4})
    block_ckpt = save_inference(Denoiser(block_cfg).eval(), {"kind": "byte"}, tmp_path_factory.mktemp("block_ckpt"))
    serve.run(build_app({**args, "checkpoint": str(block_ckpt), "num_cpus": 0.5}), name="block", route_prefix="/block")
    serve.run(build_app(chat), name="chat", route_prefix="/chat")
    # The autoregressive baseline, served by the same app.
    ar_cfg = tiny_cfg.model_copy(update={"attention": "causal"})
    ar_ckpt = save_inference(Denoiser(ar_cfg).eval(), {"kind": "byte"}, tmp_path_factory.mktemp("ar_ckpt"))
    serve.run(build_app({**args, "checkpoint": str(ar_ckpt), "num_cpus": 0.25, "torch_threads": 1}), name="ar",
              route_prefix="/ar")
    # Embedding diffusion: an ODE over the whole answer, a step event per call.
    emb_cfg = tiny_cfg.model_copy(update={"noise": "gaussian"})
    emb_ckpt = save_inference(Denoiser(emb_cfg).eval(), {"kind": "byte"}, tmp_path_factory.mktemp("emb_ckpt"))
    serve.run(build_app({**args, "checkpoint": str(emb_ckpt), "num_cpus": 0.25, "torch_threads": 1}), name="emb",
              route_prefix="/emb")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body}, timeout=120)


def test_completion_is_deterministic_for_a_seed(server):
    r = complete(server, prompt="s931420=", max_tokens=16, seed=3, temperature=1.0, n=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL and len(body["choices"]) == 2
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] in ("stop", "length") and isinstance(c["text"], str) for c in body["choices"])
    # max_tokens 16 keeps the server default's 2 tokens per step: 8 model calls.
    assert body["usage"]["prompt_tokens"] == 2 * 9 and all(c["model_calls"] == 8 for c in body["choices"])
    again = complete(server, prompt="s931420=", max_tokens=16, seed=3, temperature=1.0, n=2).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in body["choices"]]


def test_concurrent_requests_are_batched_and_each_answered_as_if_alone(server):
    before = httpx.get(f"{server}/v1/stats").json()["batch_sizes"]
    bodies = [{"model": MODEL, "prompt": f"r{i:06d}=", "seed": i, "temperature": 1.0,
               "max_tokens": 16 if i % 2 else 8, "steps": 8 if i % 2 else 4} for i in range(32)]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{server}/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    after = httpx.get(f"{server}/v1/stats").json()["batch_sizes"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
    assert sum(k * v for k, v in new.items()) == 32 and max(new) > 1, new
    # Batched with others (of other settings too), each is what it would be alone.
    for k in (0, 1, 17, 30):
        alone = httpx.post(f"{server}/v1/completions", json=bodies[k], timeout=60).json()
        assert alone["choices"][0]["text"] == responses[k].json()["choices"][0]["text"]


def test_stream_sharpens_step_by_step_and_ends_with_the_text(server):
    body = {"model": MODEL, "prompt": "q1.3..2.4=", "max_tokens": 16, "steps": 8, "seed": 5, "stream": True}
    events = []
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    unmasked = [c["num_unmasked"] for c in chunks]
    assert len(chunks) == 9 and unmasked == sorted(unmasked) and unmasked[0] < unmasked[-2] == 16
    assert "_" in chunks[0]["choices"][0]["text"] and chunks[-1]["choices"][0]["finish_reason"] is not None
    plain = complete(server, **{**body, "stream": False}).json()
    assert chunks[-1]["choices"][0]["text"] == plain["choices"][0]["text"]


def test_a_dropped_stream_stops_its_model_calls(server):
    stats = lambda: httpx.get(f"{server}/big/v1/stats", timeout=30).json()  # noqa: E731
    before = stats()["stream_model_calls"]
    body = {"model": MODEL, "prompt": "s1=", "seed": 1, "stream": True}
    with httpx.stream("POST", f"{server}/big/v1/completions", json=body, timeout=120) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["step"] == 0
    # The client is gone: the replica stops that row at its next step, far short of 768 calls.
    deadline = time.time() + 30
    while time.time() < deadline and stats()["active_streams"]:
        time.sleep(0.2)
    time.sleep(1)  # the step already running when the client went finishes
    settled = stats()["stream_model_calls"]
    time.sleep(2)
    after = stats()
    print(f"model calls made for the dropped stream: {after['stream_model_calls'] - before} of 768")
    assert after["active_streams"] == 0 and after["stream_model_calls"] == settled
    assert after["stream_model_calls"] - before < 768 // 2


def test_streams_whose_clients_leave_before_the_first_chunk_are_not_left_counted(server):
    """A client may leave before its stream's first event: while the request is on its way, or
    before the response has started. ``active_streams`` must come back to 0 either way, including
    when the response's body never runs (the server cancels it before it starts). That last case is
    made here by asking for a stream through a handle: its reply, a response around a generator
    nobody iterates, never reaches anyone."""
    from ray import serve

    from dlm_ray.serving.api import CompletionRequest

    stats = lambda: httpx.get(f"{server}/big/v1/stats", timeout=30).json()  # noqa: E731
    body = json.dumps({"model": MODEL, "prompt": "s1=", "seed": 1, "stream": True}).encode()
    request = (b"POST /big/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
    port = int(server.rsplit(":", 1)[1])
    for wait_s in (0.0, 0.005, 0.02, 0.05):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request)
            time.sleep(wait_s)  # the first event takes a model call of ~800 positions: longer than this
    with pytest.raises(Exception):  # noqa: B017 - the reply cannot cross to the caller; what it left is the test
        serve.get_app_handle("big").completions.remote(CompletionRequest(model=MODEL, prompt="s1=", stream=True)) \
            .result(timeout_s=60)
    deadline = time.time() + 30
    while time.time() < deadline and stats()["active_streams"]:
        time.sleep(0.2)
    assert stats()["active_streams"] == 0


def test_the_health_probe_waits_for_a_generation_and_never_runs_beside_it(server):
    """Serve's probe uses the model as sampling does, under its lock: called while a stream is being
    generated, it comes back only once the generation has made its last model call."""
    from ray import serve

    handle = serve.get_app_handle("big")
    handle.check_health.remote().result(timeout_s=60)  # an idle model: probed at once (and the handle warm)
    stats = lambda: httpx.get(f"{server}/big/v1/stats", timeout=30).json()  # noqa: E731
    before = stats()["stream_model_calls"]
    body = {"model": MODEL, "prompt": "s2=", "seed": 2, "stream": True, "max_tokens": 64}
    with httpx.stream("POST", f"{server}/big/v1/completions", json=body, timeout=120) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(next(lines)[6:])["step"] == 0  # the generation holds the model now
        handle.check_health.remote().result(timeout_s=60)
        assert stats()["stream_model_calls"] - before == 64  # every step made before the probe ran
        assert list(lines)[-1] == "data: [DONE]"


def test_concurrent_streams_share_model_calls_and_each_ends_as_if_alone(server):
    async def fire() -> list[list[dict]]:
        async def one(k: int) -> list[dict]:
            body = {"model": MODEL, "prompt": f"s{k}=", "max_tokens": 16, "steps": 8, "seed": k, "stream": True}
            events = []
            async with client.stream("POST", f"{server}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
            return events

        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(k) for k in range(12)))

    streams = asyncio.run(fire())
    sizes = httpx.get(f"{server}/v1/stats").json()["stream_batch_sizes"]
    assert max(int(k) for k in sizes) > 1, sizes  # streams met in one batch
    for k in (0, 5, 11):
        plain = complete(server, prompt=f"s{k}=", max_tokens=16, steps=8, seed=k).json()
        assert streams[k][-1]["choices"][0]["text"] == plain["choices"][0]["text"]
        assert len(streams[k]) == 9


def test_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL]
    out = client.completions.create(model=MODEL, prompt=["s123=", "r456="], max_tokens=8, seed=1,
                                    extra_body={"steps": 4})
    assert len(out.choices) == 2 and all(isinstance(c.text, str) for c in out.choices)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="s1=", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="s1=")


def test_chat_completions_with_the_openai_client_plain_and_streamed(server, chat_ckpt):
    import openai

    client = openai.OpenAI(base_url=f"{server}/chat/v1", api_key="unused")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, seed=7, temperature=1.0,
                                         extra_body={"steps": 8})
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    # The answer is the model's completion of the conversation rendered with its own template.
    model, tok, _ = load_inference(chat_ckpt)
    ids = encode_chat(tok, messages)
    local = complete_ids(model, tok, [ids], SampleConfig(**{**CHAT_SAMPLE, "temperature": 1.0}), [7])[0]
    assert choice.message.content == local.text
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(local.ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, seed=7,
                                                 temperature=1.0, stream=True, extra_body={"steps": 8}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len(chunks) == 1 + 8 + 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="special token text '<\\|eot_id\\|>'"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a<|eot_id|>b"}])
    byte_model = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        byte_model.chat.completions.create(model=MODEL, messages=messages)
    assert httpx.get(f"{server}/chat/health").status_code == 200


def test_a_block_model_is_served_in_its_own_blocks_plain_and_streamed(server):
    body = {"model": MODEL, "prompt": "s1234=", "max_tokens": 10, "seed": 4, "temperature": 1.0}
    plain = httpx.post(f"{server}/block/v1/completions", json=body, timeout=60).json()
    # 10 tokens round up to 3 blocks of 4; 2 steps per block (the default's 2 tokens per step) and
    # nothing more: the prompt runs in the first block's first step, and each finished block's
    # keys/values are written by the next block's first step.
    assert plain["choices"][0]["model_calls"] == 3 * 2
    events = []
    with httpx.stream("POST", f"{server}/block/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert len(events) == 3 * 2 + 1 and events[-1]["choices"][0]["text"] == plain["choices"][0]["text"]
    assert httpx.post(f"{server}/block/v1/completions", json={**body, "cache": "dual"}, timeout=60).status_code == 400


def stream_texts(url: str, body: dict) -> list[str]:
    texts = []
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                texts.append(json.loads(line[6:])["choices"][0]["text"])
    return texts


def test_a_suffix_is_filled_up_to_plain_and_streamed(server, tiny_cfg):
    body = {"model": MODEL, "prompt": "s3142=", "suffix": "4\n", "max_tokens": 8, "steps": 8, "block_length": 8}
    plain = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert plain.status_code == 200, plain.text
    text = plain.json()["choices"][0]["text"]
    torch.manual_seed(0)
    model = Denoiser(tiny_cfg).eval()  # the main app's weights
    tok = ByteTokenizer()
    local = complete_ids(model, tok, [[tok.eos_id, *tok.encode("s3142=")]], SampleConfig(gen_length=8, steps=8,
                         block_length=8), [0], suffixes=[tok.encode("4\n")])[0]
    assert text == local.text
    assert stream_texts(f"{server}/v1/completions", body)[-1] == text
    too_long = httpx.post(f"{server}/v1/completions", json={**body, "suffix": "9" * 120}, timeout=60)
    assert too_long.status_code == 400 and "suffix of 120 tokens" in too_long.json()["error"]["message"]


def test_an_autoregressive_model_is_served_one_token_per_call_and_refuses_a_suffix(server):
    body = {"model": MODEL, "prompt": "s3142=", "max_tokens": 12, "seed": 3, "temperature": 1.0}
    plain = httpx.post(f"{server}/ar/v1/completions", json=body, timeout=60).json()
    assert plain["choices"][0]["model_calls"] == 12
    texts = stream_texts(f"{server}/ar/v1/completions", body)
    assert len(texts) == 12 + 1 and texts[-1] == plain["choices"][0]["text"]  # a step event per token, then the answer
    for bad, fragment in [({"suffix": "9"}, "infilling needs a full-attention model"), ({"cache": "dual"}, "KV cache"),
                          ({"cfg_scale": 1.0}, "guidance")]:
        r = httpx.post(f"{server}/ar/v1/completions", json={**body, **bad}, timeout=60)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_an_embedding_diffusion_model_is_served_by_its_ode_plain_and_streamed(server):
    from ray import serve

    serve.get_app_handle("emb").check_health.remote().result(timeout_s=60)  # its probe is a call it answers
    body = {"model": MODEL, "prompt": "s3142=", "max_tokens": 12, "seed": 3, "steps": 4}
    plain = httpx.post(f"{server}/emb/v1/completions", json=body, timeout=60).json()
    assert plain["choices"][0]["model_calls"] == 4
    texts = stream_texts(f"{server}/emb/v1/completions", body)
    assert len(texts) == 4 + 1 and texts[-1] == plain["choices"][0]["text"]  # a step event per call, then the answer
    again = httpx.post(f"{server}/emb/v1/completions", json=body, timeout=60).json()
    assert again["choices"][0]["text"] == plain["choices"][0]["text"]  # deterministic for a seed
    for bad, fragment in [({"suffix": "9"}, "infilling is not built"), ({"cache": "dual"}, "cache='dual'"),
                          ({"threshold": 0.9}, "threshold")]:
        r = httpx.post(f"{server}/emb/v1/completions", json={**body, **bad}, timeout=60)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


BAD = [
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt 0 is empty"),
    ({"prompt": []}, 400, "empty list"),
    ({"prompt": "x" * 200}, 400, "exceeds the model's context"),
    ({"prompt": "s1=", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "s1=", "max_tokens": 10000}, 400, "exceeds the model's context"),
    ({"prompt": "s1=", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "s1=", "seed": 2**64}, 400, "seed"),
    ({"prompt": "s1=", "n": 99}, 400, "at most"),
    ({"prompt": "s1=", "max_tokens": 16, "block_length": 8, "steps": 5}, 400, "not divisible"),
    ({"prompt": "s1=", "remasking": "best"}, 400, "remasking"),
    ({"prompt": "s1=", "temprature": 1}, 400, "temprature"),
    ({"prompt": ["a", "b"], "stream": True}, 400, "stream supports one prompt"),
    ({"prompt": "s1=", "model": "other"}, 404, "not served here"),
    ({"prompt": "\ud800"}, 400, "not valid Unicode"),
    ({"prompt": "s1=", "steps": 2**40}, 400, "steps"),
    ({"prompt": "s1=", "steps": 2**63}, 400, "steps"),
    ({"prompt": "s1=", "max_tokens": 8, "steps": 10**7}, 400, "steps"),
    ({"prompt": "s1=", "max_tokens": 8, "steps": 16}, 400, "exceeds gen_length"),
    ({"prompt": "s1=", "block_length": 2**40}, 400, "block_length"),
    ({"prompt": "s1=", "temperature": 1e308}, 400, "temperature"),
    ({"prompt": "s1=", "temperature": 3}, 400, "temperature"),
    ({"prompt": "s1=", "refresh_every": 2}, 400, "refresh_every=2 needs cache 'prefix' or 'dual'"),
    ({"prompt": "s1=", "cfg_scale": 1e308}, 400, "cfg_scale"),
    ({"prompt": "s1=", "stream": "yes"}, 400, "stream"),
    ({"prompt": "s1=", "stream": 1}, 400, "stream"),
    ({"prompt": "s1=", "seed": True}, 400, "seed"),
    ({"prompt": "s1=", "max_tokens": "8"}, 400, "max_tokens"),
]


@pytest.mark.parametrize("body,status,fragment", BAD)
def test_bad_requests_get_4xx_json_and_the_service_stays_up(server, body, status, fragment):
    # json.dumps escapes a lone surrogate as \ud800, which httpx's own encoder refuses to send.
    r = httpx.post(f"{server}/v1/completions", content=json.dumps({"model": MODEL, **body}).encode(),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    assert complete(server, prompt="s1=", max_tokens=8, steps=4).status_code == 200


@pytest.mark.parametrize("text", ['{"model": "dlm-test", "prompt": "s1=", "temperature": Infinity}',
                                  '{"model": "dlm-test", "prompt": "s1=", "threshold": Infinity}',
                                  '{"model": "dlm-test", "prompt": "s1=", "factor": NaN}'])
def test_non_finite_numbers_are_refused(server, text):
    r = httpx.post(f"{server}/v1/completions", content=text.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


@pytest.mark.parametrize("bad", [{"temperature": 5}, {"threshold": 3.0}, {"steps": True}, {"cache": "blocks"},
                                 {"refresh_every": 2}, {"seed": -1}, {"factor": 1.0, "threshold": 0.5}])
def test_a_bad_sampler_setting_is_refused_as_a_batch_row_is(server, bad):
    """One check for both: the setting Serve answers 400 to is an error row in batch generation
    (``prepare_batch`` is the job's own step), with the same message."""
    import pyarrow as pa

    from dlm_ray.config.inference import GenerateConfig
    from dlm_ray.data.prompts import READ_SCHEMA, _row, prepare_batch

    r = complete(server, prompt="s1=", **bad)
    table = pa.Table.from_pylist([_row("x", "x row 0", "s1=", bad, None)], schema=READ_SCHEMA)
    row = prepare_batch(table, cfg=GenerateConfig(sample=SampleConfig(**MAIN_SAMPLE)), tokenizer=ByteTokenizer(),
                        max_seq_len=128).to_pylist()[0]
    assert r.status_code == 400 and row["error"] is not None, (r.text, row["error"])
    assert r.json()["error"]["message"] == row["error"]


def test_unknown_paths_and_methods_answer_in_the_same_error_body(server):
    r = httpx.get(f"{server}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_a_poison_request_fails_alone(server):
    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            good = [client.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": f"s{i}=", "seed": i})
                    for i in range(8)]
            poison = client.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "s1=", "steps": 2**63})
            return await asyncio.gather(poison, *good)

    poison, *good = asyncio.run(fire())
    assert poison.status_code == 400 and "steps" in poison.json()["error"]["message"]
    assert [r.status_code for r in good] == [200] * 8


def _hostile_bodies(rng) -> list:
    """Bodies of every kind a hostile client sends: wrong types, out-of-range and non-finite numbers,
    huge integers, odd strings, unknown fields, wrong shapes."""
    values = [None, True, False, 0, -1, 1, 2**31, 2**40, 2**63, 2**64, -2**63, 1e308, -1e308, 0.5, "", "x", "yes",
              "\ud800", "\x00", "s1=" * 100, [], ["s1="], [1, 2], {}, {"a": 1}, "Infinity", 3.14]
    fields = ["prompt", "max_tokens", "temperature", "n", "seed", "stop", "stream", "steps", "block_length",
              "remasking", "cfg_scale", "threshold", "factor", "cache", "model", "user", "logprobs", "echo"]
    out: list = [None, [], "just text", 5, [{"model": MODEL}]]
    out += [{"model": MODEL, "prompt": "s1=", f: v} for f in fields for v in values]  # every value in every field
    while len(out) < 1000:
        body = {"model": MODEL, "prompt": "s1="}
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(fields)] = rng.choice(values)
        out.append(body)
    return out


def test_fuzzed_requests_get_4xx_json_never_5xx(server):
    import random

    rng = random.Random(1234)
    counts: dict[int, int] = {}
    with httpx.Client(timeout=120) as client:
        for k, body in enumerate(_hostile_bodies(rng)):
            r = client.post(f"{server}/v1/completions", content=json.dumps(body).encode(),
                            headers={"content-type": "application/json"})
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
            assert r.status_code < 500, (body, r.text)
            if r.status_code != 200:
                assert "message" in r.json()["error"], (body, r.text)
            if k % 100 == 99:
                assert complete(server, prompt="s1=", max_tokens=8, steps=4).status_code == 200
    print(f"fuzz: {sum(counts.values())} requests, by status {dict(sorted(counts.items()))}")
    assert counts.get(400, 0) > 700


def test_malformed_json_and_health(server):
    r = httpx.post(f"{server}/v1/completions", content=b'{"model": "dlm-test", "prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_over_capacity_is_a_prompt_503_not_a_hang(server):
    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": MODEL, "prompt": "s1=", "seed": 1}
            return await asyncio.gather(*(client.post(f"{server}/small/v1/completions", json=body) for _ in range(8)))

    codes = sorted(r.status_code for r in asyncio.run(fire()))
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
