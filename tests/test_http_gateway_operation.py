"""The HTTP gateway in operation: HTTPS and mTLS from the server's PEM files, bearer tokens (the training script's and
the Modular step's own ways of sending one), a real `promptcast serve --http-port` drained by SIGTERM, and the
command's one-line refusals of a bad `--http-port`."""

from __future__ import annotations

import signal
import sys

import pytest
import requests

from conftest import assert_same, free_port, run_cli
from denoiser_client import RemoteTextEncoder
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
from test_http_gateway import compute_remote_text_embeddings
from test_security import TOKEN, pki  # noqa: F401 - the test PKI fixture, shared


@pytest.fixture(scope="module")
def https_server(tiny_models, pki, tmp_path_factory):  # noqa: F811 - pki is the imported fixture
    config = ServerConfig([ModelSpec(str(tiny_models["flux1"]), name="tiny-flux1")], port=0, http_port=0,
                          cache_dir=str(tmp_path_factory.mktemp("cache-https")), token_file=str(pki / "tokens"),
                          tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    with BackgroundServer(config) as server:
        yield server


def test_https_and_tokens(https_server, pki):  # noqa: F811
    url, ca = https_server.http_url, str(pki / "ca.pem")
    assert url.startswith("https://")
    cases = (({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": "Basic x"}, 401),
             ({"Authorization": f"Bearer {TOKEN}"}, 200), ({"Authorization": "Bearer another-token"}, 200))
    for headers, status in cases:
        response = requests.post(url + "/predict", json={"prompt": "a token fox"}, headers=headers, verify=ca,
                                 timeout=30)
        assert response.status_code == status, (headers, response.text)
        if status == 401:
            assert response.json()["code"] == "UNAUTHENTICATED" and response.headers["www-authenticate"] == "Bearer"
    assert requests.get(url + "/healthz", verify=ca, timeout=10).status_code == 200  # probes need no token
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url + "/healthz", timeout=10)  # a client that does not trust the CA
    with pytest.raises(requests.ConnectionError):
        requests.get(url.replace("https://", "http://") + "/healthz", timeout=10)  # plaintext to the TLS port


def test_mtls_requires_a_client_certificate(tiny_models, pki, tmp_path):  # noqa: F811
    config = ServerConfig([ModelSpec(str(tiny_models["flux1"]), name="tiny-flux1")], port=0, http_port=0,
                          cache_dir=str(tmp_path), tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                          tls_client_ca=str(pki / "ca.pem"))
    with BackgroundServer(config) as server:
        url, ca = server.http_url + "/predict", str(pki / "ca.pem")
        with pytest.raises(requests.ConnectionError):
            requests.post(url, json={"prompt": "x"}, verify=ca, timeout=10)
        with pytest.raises(requests.ConnectionError):
            requests.post(url, json={"prompt": "x"}, verify=ca, timeout=10,
                          cert=(str(pki / "stranger.pem"), str(pki / "stranger.key")))
        ok = requests.post(url, json={"prompt": "x"}, verify=ca, timeout=30,
                           cert=(str(pki / "client.pem"), str(pki / "client.key")))
        assert ok.status_code == 200


def test_modular_step_sends_hf_token_as_the_bearer(https_server, pki, monkeypatch):  # noqa: F811
    from diffusers.modular_pipelines.flux2 import Flux2RemoteTextEncoderStep

    monkeypatch.setattr(Flux2RemoteTextEncoderStep, "REMOTE_URL", https_server.http_url + "/predict")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki / "ca.pem"))
    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(requests.HTTPError, match="401"):
        Flux2RemoteTextEncoderStep().init_pipeline()(prompt="a fox", output="prompt_embeds")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # huggingface_hub's get_token() reads it
    got = Flux2RemoteTextEncoderStep().init_pipeline()(prompt="a fox", output="prompt_embeds")
    assert got.shape == (1, 512, 48)  # this server hosts FLUX.1: the step takes its prompt_embeds as they come


def test_serve_subprocess_serves_http_and_drains_on_sigterm(server_process, tiny_models, tmp_path):
    http_port = free_port()
    server = server_process("--model", f"tiny-flux2={tiny_models['flux2']}", "--http-port", str(http_port),
                            "--cache-dir", str(tmp_path)).wait_serving()
    url = f"http://127.0.0.1:{http_port}"
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    embeds = compute_remote_text_embeddings(url + "/predict", "a subprocess fox")
    with RemoteTextEncoder(server.address, timeout=60) as enc:
        assert_same({"prompt_embeds": embeds}, {"prompt_embeds": enc.encode("a subprocess fox")["prompt_embeds"]})
    assert server.stop(signal.SIGTERM) == 0
    log = server.output()
    assert f"HTTP gateway on http://127.0.0.1:{http_port}" in log and "method=HTTP/predict" in log


@pytest.mark.parametrize("args, words", [
    (["--http-port", "70000"], "70000 is not a port"),
    (["--http-port", "50123", "--port", "50123"], "50123 is --port too"),
])
def test_serve_refuses_a_bad_http_port_in_one_line(args, words, capsys):
    from promptcast.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "never-loaded", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and words in err and err.count("\n") == 1 and err.startswith("error:"), err


def test_serve_http_port_without_the_http_extra_says_how_to_install(monkeypatch, capsys):
    from promptcast.cli import main

    monkeypatch.setitem(sys.modules, "starlette", None)  # as if it were not installed
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "never-loaded", "--http-port", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "pip install 'promptcast[http]'" in err and err.count("\n") == 1, err


def test_serve_with_an_http_port_in_use_fails_in_one_line_before_loading(tiny_models):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--model", tiny_models["flux1"], "--host", "127.0.0.1", "--port", "0",
                         "--http-port", port, "--cache-dir", "none")
    assert result.returncode == 1 and "loading the text encoders" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --http-port {port}: 127.0.0.1:{port} is already in use")
