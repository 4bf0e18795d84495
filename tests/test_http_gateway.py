"""The HTTP gateway (`serve --http-port`) against real servers on free loopback ports: Hugging Face's hosted FLUX.2
text encoder's own clients (the LoRA training script's request code, diffusers' `Flux2RemoteTextEncoderStep`) get
what `RemoteTextEncoder.encode` gets, for every family; every error has its JSON body and status; limits, the queue
bound, health, drain, metrics and the request log are the gRPC door's. (HTTPS, tokens and `promptcast serve` itself:
test_http_gateway_operation.py.)"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import threading
import uuid

import pytest
import requests
import torch
from safetensors.torch import load as load_safetensors

from conftest import assert_same, wait_for
from denoiser_client import RemoteTextEncoder, errors
from encoder_server.families import get_encoder
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
from encoder_server.service import Limits
from test_operations import GatedEncoder, sample, scrape

SAFETENSORS = {"Accept": "application/vnd.safetensors"}
NAMES = {"flux1": "tiny-flux1", "flux2": "tiny-flux2", "flux2-klein": "tiny-klein"}
LIMITS = Limits(max_prompts_per_call=8, max_prompt_chars=200)  # the FLUX.1 server's: small enough to pass


@pytest.fixture(scope="module")
def servers(tiny_models, tmp_path_factory):
    """One single-model server per family, gRPC and HTTP; FLUX.1's also serves metrics and has small limits."""
    started = {}
    try:
        for family, name in NAMES.items():
            extra = dict(metrics_port=0, limits=LIMITS) if family == "flux1" else {}
            config = ServerConfig([ModelSpec(str(tiny_models[family]), name=name)], port=0, http_port=0,
                                  cache_dir=str(tmp_path_factory.mktemp(f"cache-{family}")), **extra)
            started[family] = BackgroundServer(config).start()
        yield started
    finally:
        for server in started.values():
            server.stop()


def post(server, path, body=None, headers=None, **kwargs) -> requests.Response:
    return requests.post(server.http_url + path, json=body, headers=headers, timeout=60, **kwargs)


def grpc_encode(server, prompts, **kwargs):
    with RemoteTextEncoder(server.address, timeout=60) as enc:
        return enc.encode(prompts, with_info=True, **kwargs)


def compute_remote_text_embeddings(url, prompts, hf_token="hf_anything"):
    """diffusers' examples/dreambooth/train_dreambooth_lora_flux2.py, `compute_remote_text_embeddings`, with its URL
    line changed, `text_ids` (no server involved) left out, and `weights_only=True` written out: the script relies on
    torch's default, which is that since torch 2.6."""
    def _encode_single(prompt: str):
        response = requests.post(
            url,
            json={"prompt": prompt},
            headers={"Authorization": f"Bearer {hf_token}", "Content-Type": "application/json"},
        )
        assert response.status_code == 200, f"{response.status_code=}"
        return torch.load(io.BytesIO(response.content), weights_only=True)

    if isinstance(prompts, (list, tuple)):
        embeds = [_encode_single(p) for p in prompts]
        return torch.cat(embeds, dim=0)
    return _encode_single(prompts)


def test_training_script_request_code_gets_the_grpc_embeddings(servers):
    server = servers["flux2"]
    single = compute_remote_text_embeddings(server.http_url + "/predict", "a photo of sks dog")
    several = compute_remote_text_embeddings(server.http_url + "/predict", ["a photo of sks dog", "a dog in a bucket"])
    expected, _ = grpc_encode(server, ["a photo of sks dog", "a dog in a bucket"])
    assert single.shape == (1, 512, 96)
    assert_same({"prompt_embeds": single}, {"prompt_embeds": expected["prompt_embeds"][:1]})
    assert_same({"prompt_embeds": several}, {"prompt_embeds": expected["prompt_embeds"]})


def test_modular_remote_text_encoder_step_pointed_at_the_server(servers, monkeypatch):
    from diffusers.modular_pipelines.flux2 import Flux2RemoteTextEncoderStep

    server = servers["flux2"]
    monkeypatch.setattr(Flux2RemoteTextEncoderStep, "REMOTE_URL", server.http_url + "/predict")  # the one line
    pipe = Flux2RemoteTextEncoderStep().init_pipeline()
    got = pipe(prompt=["a red fox in the snow", "an owl"], output="prompt_embeds")
    expected, _ = grpc_encode(server, ["a red fox in the snow", "an owl"])
    assert_same({"prompt_embeds": got}, {"prompt_embeds": expected["prompt_embeds"]})


@pytest.mark.parametrize("family", list(NAMES))
def test_predict_answers_every_family_in_both_forms(servers, family):
    server, prompts = servers[family], [f"a {family} fox", f"a {family} owl"]
    pickled = post(server, "/predict", {"prompt": prompts})
    safe = post(server, "/predict", {"prompt": prompts, "model": NAMES[family]}, SAFETENSORS)
    expected, info = grpc_encode(server, prompts)
    assert pickled.status_code == 200 and pickled.headers["content-type"] == "application/octet-stream"
    assert_same({"prompt_embeds": torch.load(io.BytesIO(pickled.content), weights_only=True)},
                {"prompt_embeds": expected["prompt_embeds"]})
    assert safe.status_code == 200 and safe.headers["content-type"] == "application/vnd.safetensors"
    assert_same(load_safetensors(safe.content), expected)  # FLUX.1: pooled_prompt_embeds too, batch first
    assert pickled.headers["x-cache-status"] == "miss,miss" and info.cache_status == ["memory", "memory"]


def test_v1_encode_carries_cache_status_and_keys_in_the_metadata(servers):
    server, prompts = servers["flux1"], [f"clip side {uuid.uuid4()}", "clip side two"]
    body = {"model": "tiny-flux1", "prompts": prompts, "prompts_2": ["t5 side one", "t5 side two"],
            "max_sequence_length": 16}
    first, second = post(server, "/v1/encode", body), post(server, "/v1/encode", body)
    expected, info = grpc_encode(server, prompts, prompt_2=body["prompts_2"], max_sequence_length=16)
    for response in (first, second):
        assert response.status_code == 200 and response.headers["content-type"] == "application/vnd.safetensors"
        assert_same(load_safetensors(response.content), expected)
    metadata = [safetensors_metadata(response.content) for response in (first, second)]
    assert [json.loads(m["cache_status"]) for m in metadata] == [["miss", "miss"], ["memory", "memory"]]
    assert json.loads(metadata[0]["cache_keys"]) == json.loads(metadata[1]["cache_keys"]) == info.cache_keys
    assert metadata[0]["model"] == "tiny-flux1" and metadata[0]["max_sequence_length"] == "16"


def safetensors_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file: its header is 8 bytes of length, then JSON."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size])["__metadata__"]


@pytest.mark.parametrize("body, status, code, words", [
    (b"{not json", 400, "INVALID_ARGUMENT", "not JSON"),
    (b"\xff\xfe\x00garbage", 400, "INVALID_ARGUMENT", "not JSON"),
    (b"[\"a list\"]", 400, "INVALID_ARGUMENT", "must be an object"),
    (b"{}", 400, "INVALID_ARGUMENT", "'prompt' is missing"),
    (b"{\"prompt\": 7}", 400, "INVALID_ARGUMENT", "'prompt' is int 7"),
    (b"{\"prompt\": [\"a\", 2]}", 400, "INVALID_ARGUMENT", "list of strings"),
    (b"{\"prompt\": []}", 400, "INVALID_ARGUMENT", "prompts is empty"),
    (b"{\"prompt\": \"x\", \"prompts\": [\"y\"]}", 400, "INVALID_ARGUMENT", "unknown field 'prompts'"),
    (b"{\"prompt\": \"x\", \"model\": 3}", 400, "INVALID_ARGUMENT", "must be a model name"),
    (b"{\"prompt\": \"x\", \"model\": \"no-such-model\"}", 404, "NOT_FOUND", "'no-such-model' is not hosted"),
    (json.dumps({"prompt": ["p"] * 9}).encode(), 413, "INVALID_ARGUMENT", "9 prompts in one call is over 8"),
    (json.dumps({"prompt": "x" * 201}).encode(), 413, "INVALID_ARGUMENT", "201 characters, over 200"),
])
def test_bad_predict_bodies_get_the_json_error_and_status(servers, body, status, code, words):
    response = requests.post(servers["flux1"].http_url + "/predict", data=body, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    assert response.json()["code"] == code and words in response.json()["error"], response.json()


def test_bad_v1_encode_fields_and_routes(servers):
    server = servers["flux1"]
    cases = [({"prompts": "one string"}, 400, "a list of strings"),
             ({"prompts": ["x"], "max_sequence_length": "long"}, 400, "whole number"),
             ({"prompts": ["x"], "max_sequence_length": 4096}, 400, "over 512, the limit"),
             ({"prompts": ["x"], "prompts_2": ["a", "b"]}, 400, "prompts_2 has 2 entries")]
    for body, status, words in cases:
        response = post(server, "/v1/encode", body)
        assert response.status_code == status and words in response.json()["error"], (body, response.text)
    assert requests.get(server.http_url + "/predict", timeout=10).json()["code"] == "UNIMPLEMENTED"
    missing = requests.get(server.http_url + "/v2/anything", timeout=10)
    assert missing.status_code == 404 and "POST /predict" in missing.json()["error"]
    with pytest.raises(errors.InvalidArgument, match="9 prompts in one call"):  # still INVALID_ARGUMENT on gRPC
        grpc_encode(server, ["p"] * 9)


def _raw(port: int, head: bytes, body_chunks=()) -> bytes:
    """The server's answer to `head` (+ chunks), read without sending anything more."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        for chunk in body_chunks:
            s.sendall(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < 10:
            data = s.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_oversize_body_is_refused_before_it_is_read(servers):
    gateway = servers["flux1"].server.gateway
    port, bound = gateway.port, gateway.max_body
    declared = _raw(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000000000\r\n\r\n")  # and not one byte of the body
    assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
    assert b'"code":"INVALID_ARGUMENT"' in declared and b"Content-Length 1000000000 is over" in declared
    chunk = b'{"prompt": "' + b"x" * 60_000
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (bound // len(chunk) + 1)  # chunked, never finished
    streamed = _raw(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", chunks)
    assert streamed.startswith(b"HTTP/1.1 413") and b"the body is over" in streamed, streamed[:200]
    assert post(servers["flux1"], "/predict", {"prompt": "still serving"}).status_code == 200


def test_metrics_and_request_log_count_http_calls(servers, caplog):
    server = servers["flux1"]
    port = server.server.metrics_port
    before, prompt = scrape(port), f"metrics over http {uuid.uuid4()}"
    with caplog.at_level(logging.INFO, logger="promptcast.requests"):
        ok = post(server, "/predict", {"prompt": [prompt, prompt + " 2"]}, {"X-Request-Id": "http-call-1"})
        post(server, "/v1/encode", {"prompts": [prompt]})  # a memory hit
        post(server, "/predict", {"prompt": "x", "model": "nope"})
        assert wait_for(lambda: sample(scrape(port), "promptcast_requests_in_flight") == 0)
    after = scrape(port)
    assert ok.headers["x-request-id"] == "http-call-1"

    def grew(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("promptcast_requests_total", method="HTTP/predict", model="tiny-flux1", code="OK") == 1
    assert grew("promptcast_requests_total", method="HTTP/v1/encode", model="tiny-flux1", code="OK") == 1
    assert grew("promptcast_requests_total", method="HTTP/predict", model="unknown", code="NOT_FOUND") == 1
    assert grew("promptcast_cache_misses_total") == 2 and grew("promptcast_cache_hits_total", tier="memory") == 1
    assert grew("promptcast_streamed_bytes_total", model="tiny-flux1") >= len(ok.content)
    lines = [r.getMessage() for r in caplog.records if r.name == "promptcast.requests"]
    assert any("request_id=http-call-1 model=tiny-flux1 prompts=2 code=OK" in line and "cache=miss:2" in line
               and "method=HTTP/predict" in line and f"bytes={len(ok.content)}" in line for line in lines), lines
    assert any("model=nope prompts=1 code=NOT_FOUND" in line and "method=HTTP/predict" in line for line in lines)


@pytest.fixture(scope="module")
def loaded_flux1(tiny_models):
    return get_encoder(str(tiny_models["flux1"]), name="tiny-flux1")


def _gated_server(loaded_flux1, tmp_path, gate, **config):
    background = BackgroundServer(ServerConfig([ModelSpec("unused")], port=0, http_port=0, cache_dir=str(tmp_path),
                                               **config), encoders=[GatedEncoder(loaded_flux1, gate)])
    return background, background.begin()


def _in_thread(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, result


def test_not_serving_until_warm_then_serving(loaded_flux1, tmp_path):
    gate = threading.Event()
    background, warm = _gated_server(loaded_flux1, tmp_path, gate)
    try:
        url = f"http://127.0.0.1:{background.server.http_port}"
        assert wait_for(lambda: _status(url + "/healthz") == 503)
        early = requests.post(url + "/predict", json={"prompt": "early"}, timeout=10)
        assert early.status_code == 503 and early.json()["code"] == "UNAVAILABLE" and "warming" in early.text
        gate.set()
        warm.result(30)
        assert requests.get(url + "/healthz", timeout=10).json() == {"status": "SERVING"}
        assert requests.post(url + "/predict", json={"prompt": "late"}, timeout=30).status_code == 200
    finally:
        gate.set()
        background.stop()


def _status(url):
    try:
        return requests.get(url, timeout=5).status_code
    except requests.ConnectionError:
        return None


def test_full_queue_answers_429_and_accepted_requests_finish(loaded_flux1, tmp_path):
    gate = threading.Event()
    gate.set()
    background, warm = _gated_server(loaded_flux1, tmp_path, gate, max_queue=1)
    try:
        warm.result(30)
        url, service = background.http_url + "/predict", background.server.service
        batcher = service.batchers["tiny-flux1"]
        gate.clear()  # the next forward pass holds the worker
        running = _in_thread(lambda: requests.post(url, json={"prompt": "running"}, timeout=60))
        assert wait_for(lambda: len(service._in_flight) == 1 and batcher.queued == 0)
        queued = _in_thread(lambda: requests.post(url, json={"prompt": "queued"}, timeout=60))
        assert wait_for(lambda: batcher.queued == 1)
        shed = requests.post(url, json={"prompt": "shed"}, timeout=10)
        assert shed.status_code == 429 and shed.json()["code"] == "RESOURCE_EXHAUSTED" and "--max-queue" in shed.text
        gate.set()
        for thread, result in (running, queued):
            thread.join(30)
            assert result["value"].status_code == 200
    finally:
        gate.set()
        background.stop()


def test_a_client_that_hangs_up_leaves_the_queue_before_gpu_work(loaded_flux1, tmp_path):
    gate = threading.Event()
    gate.set()
    background, warm = _gated_server(loaded_flux1, tmp_path, gate)
    try:
        warm.result(30)
        service = background.server.service
        batcher = service.batchers["tiny-flux1"]
        gate.clear()
        running = _in_thread(lambda: requests.post(background.http_url + "/predict", json={"prompt": "stays"},
                                                   timeout=60))
        assert wait_for(lambda: len(service._in_flight) == 1 and batcher.queued == 0)
        body = json.dumps({"prompt": "leaves"}).encode()
        with socket.create_connection(("127.0.0.1", background.server.http_port), timeout=10) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert wait_for(lambda: batcher.queued == 1)
        assert wait_for(lambda: batcher.queued == 0)  # hung up: no longer waiting
        dropped = batcher.stats.dropped
        gate.set()
        running[0].join(30)
        assert running[1]["value"].status_code == 200
        assert wait_for(lambda: batcher.stats.dropped == dropped + 1)  # never encoded
        assert wait_for(lambda: background.server.gateway.active == 0)
    finally:
        gate.set()
        background.stop()


def test_drain_refuses_new_requests_with_503_and_lets_in_flight_ones_finish(loaded_flux1, tmp_path):
    gate = threading.Event()
    gate.set()
    background, warm = _gated_server(loaded_flux1, tmp_path, gate)
    try:
        warm.result(30)
        url = background.http_url
        gate.clear()
        thread, result = _in_thread(lambda: requests.post(url + "/predict", json={"prompt": "in flight"}, timeout=60))
        assert wait_for(lambda: background.server.gateway.active == 1)
        stopping = asyncio.run_coroutine_threadsafe(background.server.stop(30), background.loop)
        assert wait_for(lambda: _status(url + "/healthz") == 503)
        late = requests.post(url + "/predict", json={"prompt": "too late"}, timeout=10)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]
        gate.set()
        thread.join(30)
        assert result["value"].status_code == 200
        assert torch.load(io.BytesIO(result["value"].content), weights_only=True).shape == (1, 512, 48)
        stopping.result(30)
        assert _status(url + "/healthz") is None  # the port is closed
    finally:
        gate.set()
        background.stop()
