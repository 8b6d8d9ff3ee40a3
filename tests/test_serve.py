"""The Serve app through real HTTP on localhost: completions, batching, streaming, the OpenAI
client, every bad-input case (4xx, service still up) and a clean 503 over capacity."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
import torch

from dlm_ray.checkpoint import save_inference
from dlm_ray.model import Denoiser

MODEL = "dlm-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory, tiny_cfg):
    from ray import serve

    from dlm_ray.serve import build_app

    torch.manual_seed(0)
    ckpt = save_inference(Denoiser(tiny_cfg).eval(), {"kind": "byte"}, tmp_path_factory.mktemp("serve_ckpt"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"checkpoint": str(ckpt), "model_name": MODEL, "max_batch_size": 16, "batch_wait_timeout_s": 0.05,
            "sample": {"gen_length": 16, "steps": 8, "block_length": 16},
            "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    serve.run(build_app(args), name="main", route_prefix="/")
    # A second app that can hold one request at a time and queue one more.
    small = {**args, "max_ongoing_requests": 1, "max_queued_requests": 1, "max_batch_size": 1,
             "sample": {"gen_length": 96, "steps": 96, "block_length": 96}}
    serve.run(build_app(small), name="small", route_prefix="/small")
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
]


@pytest.mark.parametrize("body,status,fragment", BAD)
def test_bad_requests_get_4xx_json_and_the_service_stays_up(server, body, status, fragment):
    r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    assert complete(server, prompt="s1=", max_tokens=8, steps=4).status_code == 200


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
