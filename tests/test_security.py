"""TLS, mTLS and bearer tokens (a failed handshake runs no RPC; tokens are compared in constant time), against
real servers and a real PKI
made with the `openssl` command."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid

import grpc
import pytest
import torch

from conftest import run_cli, wait_for
from denoiser_client import RemoteTextEncoder
from denoiser_client import errors
from encoder_server.auth import TokenAuth
from encoder_server.server import SERVICE_NAME, BackgroundServer, ModelSpec, ServerConfig, health_status
from shared.promptcast.v1 import encoder_pb2 as pb
from shared.promptcast.v1 import encoder_pb2_grpc as pb_grpc

TOKEN = "s3cret-token-for-tests"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(cwd, name):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=cwd)


def _leaf(cwd, name, ca, extensions):
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=cwd)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a client
    certificate from another CA."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    (d / "tokens").write_text(f"# tokens of the test suite\n\n{TOKEN}\n  another-token  \n")
    return d


def _config(model, pki, tmp, **kw):
    return ServerConfig([ModelSpec(str(model), name="tiny-flux1")], port=0, cache_dir=str(tmp),
                        tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), **kw)


@pytest.fixture(scope="module")
def tls_server(tiny_flux1, pki, tmp_path_factory):
    config = _config(tiny_flux1, pki, tmp_path_factory.mktemp("cache"), token_file=str(pki / "tokens"))
    with BackgroundServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(tiny_flux1, pki, tmp_path_factory):
    config = _config(tiny_flux1, pki, tmp_path_factory.mktemp("cache"), tls_client_ca=str(pki / "ca.pem"))
    with BackgroundServer(config) as server:
        yield server


def _rpcs_seen(server, settle_on: float | None = None) -> float:
    """Every promptcast call that reached the server's handlers, whatever its outcome. The server
    counts a call after its status is sent, so `settle_on` waits (a little) for that count."""
    registry = server.server.metrics.registry
    deadline = time.monotonic() + 2
    while True:
        seen = sum(s.value for metric in registry.collect() if metric.name == "promptcast_requests"
                   for s in metric.samples if s.name == "promptcast_requests_total")
        if settle_on is None or seen >= settle_on or time.monotonic() > deadline:
            return seen
        time.sleep(0.02)


def test_tls_client_with_ca_and_token_encodes(tls_server, pki, client):
    prompts = ["a fox over TLS", f"unique {uuid.uuid4()}"]
    with RemoteTextEncoder(tls_server.address, tls_ca=pki / "ca.pem", token=TOKEN, timeout=30) as enc:
        got = enc.encode(prompts, "tiny-flux1", max_sequence_length=32)
        assert [m.name for m in enc.models()] == ["tiny-flux1"]
    expected = client.encode(prompts, "tiny-flux1", max_sequence_length=32)  # plaintext session server
    assert set(got) == {"prompt_embeds", "pooled_prompt_embeds"}
    for name in got:
        assert torch.equal(got[name], expected[name])


def test_token_from_environment_and_second_token_line(tls_server, pki, monkeypatch):
    monkeypatch.setenv("PROMPTCAST_TOKEN", "another-token")  # indented line of the file, stripped
    with RemoteTextEncoder(tls_server.address, tls_ca=pki / "ca.pem", timeout=30, retries=1) as enc:
        assert enc.encode("env token", max_sequence_length=8)["prompt_embeds"].shape == (1, 8, 48)


@pytest.mark.parametrize("token", [None, "wrong", TOKEN[:-1], TOKEN + "x", "# tokens of the test suite"])
def test_missing_or_wrong_token_is_unauthenticated(tls_server, pki, monkeypatch, token):
    monkeypatch.delenv("PROMPTCAST_TOKEN", raising=False)
    before = _rpcs_seen(tls_server)
    with RemoteTextEncoder(tls_server.address, tls_ca=pki / "ca.pem", token=token, timeout=30) as enc:
        with pytest.raises(errors.Unauthenticated) as info:
            enc.encode("a fox", max_sequence_length=8)
        with pytest.raises(errors.Unauthenticated):
            enc.models()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert ("requires a token" if token is None else "not accepted") in str(info.value)
    assert _rpcs_seen(tls_server, before + 2) == before + 2  # refused at the server, once each: never retried


def test_malformed_authorization_header(tls_server, pki):
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(tls_server.address, credentials) as channel:
        stub = pb_grpc.TextEncoderStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=(("authorization", TOKEN),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer <token>" in info.value.details()


def test_health_answers_without_token(tls_server, pki):
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(tls_server.address, credentials) as channel:
        assert health_status(channel) == "SERVING"
        assert health_status(channel, SERVICE_NAME) == "SERVING"


def test_reflection_answers_without_token(tls_server, pki):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(tls_server.address, credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (response,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=10)
    assert SERVICE_NAME in {s.name for s in response.list_services_response.service}


def test_plaintext_client_against_tls_server_fails_in_handshake(tls_server):
    before = _rpcs_seen(tls_server)
    with grpc.insecure_channel(tls_server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.TextEncoderStub(channel).ListModels(pb.ListModelsRequest(), timeout=5,
                                                        metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with RemoteTextEncoder(tls_server.address, token=TOKEN, timeout=5, retries=2, backoff=0.01) as enc:
        with pytest.raises(errors.ServerUnavailable) as err:
            enc.encode("a fox", max_sequence_length=8)
    assert tls_server.address in str(err.value)
    time.sleep(0.2)  # a call that did run would be counted by now
    assert _rpcs_seen(tls_server) == before  # no RPC ran


def test_client_with_another_ca_fails_in_handshake(tls_server, pki):
    with RemoteTextEncoder(tls_server.address, tls_ca=pki / "other-ca.pem", token=TOKEN, timeout=5, retries=1
                           ) as enc:
        with pytest.raises(errors.ServerUnavailable) as err:
            enc.models()
    assert "TLS handshake failed" in str(err.value) and "--tls-ca" in str(err.value)


def test_mtls_with_client_certificate_encodes(mtls_server, pki):
    with RemoteTextEncoder(mtls_server.address, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                           tls_key=pki / "client.key", timeout=30) as enc:
        assert enc.encode("mutual tls", max_sequence_length=8)["prompt_embeds"].shape == (1, 8, 48)


@pytest.mark.parametrize("identity", [None, "stranger"])
def test_mtls_without_or_with_foreign_client_certificate_fails(mtls_server, pki, identity):
    before = _rpcs_seen(mtls_server)
    cert = key = None
    if identity:
        cert, key = pki / f"{identity}.pem", pki / f"{identity}.key"
    with RemoteTextEncoder(mtls_server.address, tls_ca=pki / "ca.pem", tls_cert=cert, tls_key=key, timeout=5,
                           retries=2, backoff=0.01) as enc:
        with pytest.raises(errors.ServerUnavailable) as err:
            enc.encode("a fox", max_sequence_length=8)
    assert mtls_server.address in str(err.value)
    time.sleep(0.2)  # a call that did run would be counted by now
    assert _rpcs_seen(mtls_server) == before  # the handshake failed: no RPC ran


def test_tokens_compared_in_constant_time_against_every_token(pki, monkeypatch):
    import hmac

    auth = TokenAuth(pki / "tokens")
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert auth.accepts(TOKEN.encode())
    assert len(calls) == 2  # no early exit on the first (matching) token
    assert not auth.accepts(b"# tokens of the test suite") and not auth.accepts(b"")


def test_empty_token_file_is_refused_at_start(tmp_path):
    (tmp_path / "tokens").write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        TokenAuth(tmp_path / "tokens")


def test_cli_prints_one_line_for_tls_and_auth_failures(tls_server, pki):
    no_ca = run_cli("models", "--encoder", tls_server.address, "--token", TOKEN, "--timeout", "5",
                    env={"PROMPTCAST_TOKEN": ""})
    no_token = run_cli("models", "--encoder", tls_server.address, "--tls-ca", pki / "ca.pem", "--timeout", "5",
                       env={"PROMPTCAST_TOKEN": ""})
    ok = run_cli("models", "--encoder", tls_server.address, "--tls-ca", pki / "ca.pem", "--timeout", "5",
                 env={"PROMPTCAST_TOKEN": TOKEN})
    for result in (no_ca, no_token):
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        errors_printed = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors_printed) == 1, result.stderr
    assert tls_server.address in no_ca.stderr and "--tls-ca" in no_ca.stderr
    assert "requires a token" in no_token.stderr
    assert ok.returncode == 0 and ok.stdout.startswith("tiny-flux1\tflux1"), ok.stderr


def test_token_file_reloaded_on_sighup(server_process, tiny_flux1, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token\n")
    server = server_process("--model", str(tiny_flux1), "--token-file", str(tokens), "--device", "cpu",
                            env={"XDG_CACHE_HOME": str(tmp_path / "xdg")}).wait_serving()

    def accepted(token) -> bool:
        with RemoteTextEncoder(server.address, token=token, timeout=10, retries=1) as enc:
            try:
                enc.models()
                return True
            except errors.Unauthenticated:
                return False

    assert accepted("old-token") and not accepted("new-token")
    tokens.write_text("# rotated\nnew-token\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: not accepted("old-token"), timeout=20, interval=0.1)
    assert accepted("new-token") and not accepted("old-token")
    assert server.proc.poll() is None  # SIGHUP reloads, it does not stop the server
