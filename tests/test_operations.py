"""Health, drain, metrics, the GPU watchdog and failover across replicas (a replica killed mid-stream, all
replicas down), against real servers: in-process where a model must be held back, real `promptcast serve`
subprocesses where signals and kills are the point."""

from __future__ import annotations

import logging
import signal
import threading
import time
import urllib.request
import uuid

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, run_cli, wait_for
from denoiser_client import RemoteTextEncoder, errors
from encoder_server.families import get_encoder
from encoder_server.server import (SERVICE_NAME, BackgroundServer, ModelSpec, ServerConfig,
                                   health_status)
from shared.promptcast.v1 import encoder_pb2 as pb
from shared.promptcast.v1 import encoder_pb2_grpc as pb_grpc
from shared.tensor_codec import EmbeddingAssembler


def scrape(port: int) -> dict[tuple, float]:
    """`{(sample name, sorted labels): value}` from a live /metrics endpoint, over loopback."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class GatedEncoder:
    """A real, loaded encoder whose forward passes wait for `gate` (a model still warming up, or a
    GPU that stopped answering)."""

    def __init__(self, inner, gate: threading.Event):
        self._inner, self.gate = inner, gate

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode(self, *args, **kwargs):
        self.gate.wait()
        return self._inner.encode(*args, **kwargs)


@pytest.fixture(scope="module")
def loaded_flux1(tiny_flux1):
    return get_encoder(str(tiny_flux1), name="tiny-flux1")


def boot_in_background(config, encoders):
    """Start an `EncoderServer` on its own loop without waiting for it to be warm."""
    background = BackgroundServer(config, encoders=encoders)
    return background, background.begin()


def test_metrics_endpoint_serves_series_that_change_after_a_request(tiny_flux1, tmp_path, caplog):
    config = ServerConfig([ModelSpec(str(tiny_flux1), name="tiny-flux1")], port=0, metrics_port=0,
                          cache_dir=str(tmp_path))
    with BackgroundServer(config) as server, RemoteTextEncoder(server.address, timeout=30) as enc:
        port = server.server.metrics_port
        before = scrape(port)
        assert sample(before, "promptcast_serving") == 1
        assert ("promptcast_queue_depth", (("model", "tiny-flux1"),)) in before
        prompt = f"metrics {uuid.uuid4()}"
        with caplog.at_level(logging.INFO, logger="promptcast.requests"):
            _, first = enc.encode([prompt, prompt + " 2"], max_sequence_length=16, with_info=True)
            enc.encode([prompt], max_sequence_length=16)  # a memory hit
            with pytest.raises(errors.ModelNotFound):
                enc.encode([prompt], model="no-such-model")
            # A call is counted and logged just after its status is sent: wait for the server's books.
            assert wait_for(lambda: sample(scrape(port), "promptcast_requests_in_flight") == 0)
        after = scrape(port)

    ok = dict(method="Encode", model="tiny-flux1", code="OK")
    assert sample(after, "promptcast_requests_total", **ok) == sample(before, "promptcast_requests_total", **ok) + 2
    assert sample(after, "promptcast_requests_total", method="Encode", model="unknown", code="NOT_FOUND") == 1
    assert sample(after, "promptcast_cache_misses_total") - sample(before, "promptcast_cache_misses_total") == 2
    assert sample(after, "promptcast_cache_hits_total", tier="memory") - sample(
        before, "promptcast_cache_hits_total", tier="memory") == 1
    # The client is on this host: its embeddings were written into its shared memory, their headers streamed.
    streamed, shared = ((sample(after, f"promptcast_{name}_bytes_total", model="tiny-flux1")
                         - sample(before, f"promptcast_{name}_bytes_total", model="tiny-flux1"))
                        for name in ("streamed", "shared_memory"))
    assert shared == 3 * (16 * 48 + 32) * 4  # three embeddings of fp32 prompt_embeds + pooled
    assert 0 < streamed < shared
    assert sample(after, "promptcast_batch_size_count") > sample(before, "promptcast_batch_size_count")
    assert sample(after, "promptcast_encode_seconds_sum") > sample(before, "promptcast_encode_seconds_sum")
    assert sample(after, "promptcast_queue_seconds_count") > sample(before, "promptcast_queue_seconds_count")
    assert sample(after, "promptcast_request_seconds_count", method="Encode") == 3
    assert sample(after, "promptcast_requests_in_flight") == 0
    # One structured line per Encode, carrying the client's request id.
    lines = [r.getMessage() for r in caplog.records if r.name == "promptcast.requests"]
    assert any(f"request_id={first.request_id} model=tiny-flux1 prompts=2 code=OK" in line
               and "cache=miss:2" in line for line in lines), lines
    assert len(first.request_id) == 16
    assert sum("model=no-such-model prompts=1 code=NOT_FOUND" in line for line in lines) == 1


def test_metrics_say_when_redis_is_down_and_the_server_keeps_serving(tiny_flux1, tmp_path):
    nobody = f"redis://127.0.0.1:{free_port()}/0"  # a real Redis client against a port nothing listens on
    config = ServerConfig([ModelSpec(str(tiny_flux1), name="tiny-flux1")], port=0, metrics_port=0,
                          cache_dir=str(tmp_path), cache_redis=nobody)
    with BackgroundServer(config) as server, RemoteTextEncoder(server.address, timeout=30) as enc:
        out = enc.encode(f"redis down {uuid.uuid4()}", max_sequence_length=8)
        samples = scrape(server.server.metrics_port)
    assert out["prompt_embeds"].shape == (1, 8, 48)
    assert sample(samples, "promptcast_cache_tier_up", tier="redis") == 0
    assert sample(samples, "promptcast_cache_entries", tier="memory") >= 1
    assert sample(samples, "promptcast_cache_bytes", tier="memory") >= 8 * 48 * 4


def test_health_not_serving_and_encode_unavailable_until_warm(loaded_flux1, tmp_path):
    gate = threading.Event()
    config = ServerConfig([ModelSpec("unused")], port=0, cache_dir=str(tmp_path))
    background, started = boot_in_background(config, [GatedEncoder(loaded_flux1, gate)])
    try:
        address = f"127.0.0.1:{background.server.port}"
        with grpc.insecure_channel(address) as channel:
            assert wait_for(lambda: _health_or_none(channel) is not None)
            assert health_status(channel) == "NOT_SERVING"
            assert health_status(channel, SERVICE_NAME) == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as info:
                list(pb_grpc.TextEncoderStub(channel).Encode(pb.EncodeRequest(prompts=["early"]), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "warming" in info.value.details()
            gate.set()  # the warm-up encode may run now
            started.result(30)
            assert health_status(channel) == "SERVING"
        with RemoteTextEncoder(address, timeout=30) as enc:
            assert enc.encode("late", max_sequence_length=8)["prompt_embeds"].shape == (1, 8, 48)
    finally:
        gate.set()
        background.stop()


def test_client_health_checks_keep_calls_off_a_not_serving_replica(loaded_flux1, flux1_server, tmp_path):
    gate = threading.Event()
    config = ServerConfig([ModelSpec("unused")], port=0, cache_dir=str(tmp_path))
    background, started = boot_in_background(config, [GatedEncoder(loaded_flux1, gate)])  # stays warming
    try:
        warming = f"127.0.0.1:{background.server.port}"
        with grpc.insecure_channel(warming) as channel:
            assert wait_for(lambda: _health_or_none(channel) == "NOT_SERVING")
        with RemoteTextEncoder(f"{warming},{flux1_server.address}", timeout=30) as enc:
            out, info = enc.encode(f"health checked {uuid.uuid4()}", max_sequence_length=8, with_info=True)
        assert info.target == flux1_server.address and info.attempts == 2
        assert out["prompt_embeds"].shape == (1, 8, 48)
        with RemoteTextEncoder(warming, timeout=30, retries=1) as alone:
            with pytest.raises(errors.ServerUnavailable, match="up but not serving"):
                alone.models()
        assert background.server.calls.active == 0 and not list(background.server.metrics.requests.collect()[0]
                                                                  .samples)  # no call reached it
    finally:
        gate.set()
        background.stop()


def _health_or_none(channel):
    try:
        return health_status(channel, timeout=1)
    except grpc.RpcError:
        return None


def test_stuck_gpu_flips_health_to_not_serving_until_it_answers(loaded_flux1, tmp_path):
    gate = threading.Event()
    gate.set()
    config = ServerConfig([ModelSpec("unused")], port=0, gpu_timeout=0.4, cache_dir=str(tmp_path))
    with BackgroundServer(config, encoders=[GatedEncoder(loaded_flux1, gate)]) as server, \
            grpc.insecure_channel(server.address) as channel:
        assert health_status(channel) == "SERVING"
        gate.clear()  # the device stops answering
        result = {}
        call = threading.Thread(target=lambda: result.update(
            out=RemoteTextEncoder(server.address, timeout=60).encode(f"stuck {uuid.uuid4()}", max_sequence_length=8)))
        call.start()
        assert wait_for(lambda: health_status(channel) == "NOT_SERVING", timeout=10)
        assert health_status(channel, SERVICE_NAME) == "NOT_SERVING"
        assert call.is_alive()
        gate.set()  # it answers again
        call.join(30)
        assert result["out"]["prompt_embeds"].shape == (1, 8, 48)
        assert wait_for(lambda: health_status(channel) == "SERVING", timeout=10)


def test_health_port_serves_health_only_in_plaintext(tiny_flux1, tmp_path):
    config = ServerConfig([ModelSpec(str(tiny_flux1), name="tiny-flux1")], port=0, health_port=0,
                          cache_dir=str(tmp_path))
    with BackgroundServer(config) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.server.health_port}") as channel:
            assert health_status(channel) == "SERVING"
            assert health_status(channel, SERVICE_NAME) == "SERVING"
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.TextEncoderStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_sigterm_drains_in_flight_call_and_exits_zero(server_process, tiny_flux1, tmp_path, client):
    metrics_port = free_port()
    server = server_process("--model", f"tiny-flux1={tiny_flux1}", "--device", "cpu", "--max-batch-size", "1",
                            "--grace", "60", "--metrics-port", str(metrics_port),
                            env={"XDG_CACHE_HOME": str(tmp_path)}).wait_serving()
    prompts = [f"drain {i} {uuid.uuid4()}" for i in range(48)]
    statuses, result = [], {}

    def watch_health():  # opened before SIGTERM: a Watch sees the change on its live connection
        with grpc.insecure_channel(server.address) as channel:
            try:
                for response in health_pb2_grpc.HealthStub(channel).Watch(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=120):
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
            except grpc.RpcError:
                pass  # the server ended the watch on its way out

    def call():
        # A slow reader: flow control keeps the server's stream open for several seconds.
        assembler = EmbeddingAssembler(len(prompts))
        with grpc.insecure_channel(server.address, [("grpc.max_receive_message_length", 8 << 20)]) as channel:
            for message in pb_grpc.TextEncoderStub(channel).Encode(
                    pb.EncodeRequest(prompts=prompts, max_sequence_length=512), timeout=120):
                assembler.feed(message)
                if message.WhichOneof("payload") == "header":
                    time.sleep(0.05)
        result["out"], result["done_at"] = assembler.result(), time.monotonic()

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    assert wait_for(lambda: statuses == ["SERVING"])
    caller = threading.Thread(target=call)
    caller.start()
    assert wait_for(lambda: sample(scrape(metrics_port), "promptcast_requests_in_flight") == 1)
    server.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: "NOT_SERVING" in statuses, timeout=10)
    with pytest.raises(errors.ServerUnavailable):
        with RemoteTextEncoder(server.address, timeout=5, retries=1) as late:
            late.encode("too late", max_sequence_length=8)
    refused_at = time.monotonic()
    caller.join(120)
    assert result["done_at"] > refused_at  # the new call was refused while the old one still ran
    assert server.proc.wait(60) == 0
    expected = client.encode(prompts, max_sequence_length=512)  # same model, in-process server
    assert set(result["out"]) == set(expected)
    for name in expected:
        assert torch.equal(result["out"][name], expected[name])
    assert "draining" in server.output()


# Each case: (streams that stop reading, cancel them at this many seconds after SIGTERM, or None: never cancel).
STALLED_DRAINS = [(2, 0.3), (1, 1.0), (2, None)]


def test_drain_exits_zero_when_stalled_streams_are_cancelled_during_the_grace_period(server_process, tiny_models,
                                                                                    tmp_path):
    """Clients that stop reading a large Encode stream (the server blocked by flow control), then cancel it while
    the server drains, or never do (the grace period runs out). Several servers at once, each a real subprocess: the
    failed writes must end the calls as cancelled, the drain must unwind every call before it releases the model
    and the packing threads, and the process must exit 0 with nothing in its log that gRPC calls an error."""
    grace = 2.0
    servers = [server_process("--model", f"tiny-flux2={tiny_models['flux2']}", "--device", "cpu",
                              "--grace", str(grace), "--cache-dir", "none", "--max-prompts-per-call", "256")
               for _ in STALLED_DRAINS]
    for server in servers:
        server.wait_serving()
    # 256 prompts x 512 tokens x 96 floats: 50 MB a stream, many times what flow control and the sockets' buffers
    # take unread. One prompt 256 times: encoded once, streamed 256 times (the work is the stream, not the encode).
    prompts = [f"stalled drain {uuid.uuid4()}"] * 256
    channels, streams = [], []
    for server, (count, _) in zip(servers, STALLED_DRAINS):
        for _ in range(count):
            channels.append(grpc.insecure_channel(server.address, [("grpc.max_receive_message_length", 8 << 20)]))
            streams.append((server, pb_grpc.TextEncoderStub(channels[-1]).Encode(
                pb.EncodeRequest(prompts=prompts, max_sequence_length=512), timeout=60)))
    try:
        for server, stream in streams:
            assert next(stream).WhichOneof("payload") == "header"  # streaming has begun; then nobody reads
        time.sleep(0.3)  # the servers fill the connections' windows and block
        sigterm_at = time.monotonic()
        for server in servers:
            server.proc.send_signal(signal.SIGTERM)
        for at, server in sorted((at, server) for server, (_, at) in zip(servers, STALLED_DRAINS) if at is not None):
            time.sleep(max(0.0, sigterm_at + at - time.monotonic()))
            for owner, stream in streams:
                if owner is server:
                    stream.cancel()
        codes = [server.proc.wait(30) for server in servers]
    finally:
        for channel in channels:
            channel.close()
    logs = [server.output() for server in servers]
    assert codes == [0] * len(servers), "\n\n".join(logs)
    for log in logs:
        assert "ExecuteBatchError" not in log and "Traceback" not in log and "still running" not in log, log
        assert "draining" in log and "drained" in log, log
    never_cancelled = logs[[at for _, at in STALLED_DRAINS].index(None)]
    assert "grace period over with 2 calls in flight" in never_cancelled, never_cancelled


class KillAfterFirstMessage(grpc.UnaryStreamClientInterceptor):
    """Test instrumentation on the client's channel to one replica: once the first message of the
    stream has arrived, SIGKILL that replica; record how the stream then ended."""

    def __init__(self, process):
        self.process = process
        self.messages = 0
        self.cut: grpc.StatusCode | None = None

    def intercept_unary_stream(self, continuation, client_call_details, request):
        stream = continuation(client_call_details, request)

        def observed():
            try:
                for message in stream:
                    self.messages += 1
                    if self.messages == 1:
                        self.process.send_signal(signal.SIGKILL)
                        self.process.wait(10)
                    yield message
            except grpc.RpcError as e:
                self.cut = e.code()
                raise

        return observed()


def test_replica_killed_mid_stream_client_rerequests_whole_on_another(server_process, tiny_flux1, tmp_path):
    # Each replica its own disk cache, as on separate machines: the retry must really encode again.
    replicas = [server_process("--model", f"tiny-flux1={tiny_flux1}", "--device", "cpu",
                               env={"XDG_CACHE_HOME": str(tmp_path / str(i))}) for i in range(3)]
    for replica in replicas:
        replica.wait_serving()
    # 64 prompts x 512 tokens: 6.3 MB, about twice what HTTP/2 flow control lets the server send ahead
    # of the reader, so the kill always lands with data still unsent.
    prompts = [f"failover {i} {uuid.uuid4()}" for i in range(64)]
    with RemoteTextEncoder(",".join(r.address for r in replicas), timeout=60, backoff=0.05) as enc:
        killer = KillAfterFirstMessage(replicas[0].proc)
        enc._stubs[0] = pb_grpc.TextEncoderStub(grpc.intercept_channel(enc._channels[0], killer))
        got, info = enc.encode(prompts, max_sequence_length=512, with_info=True)
    assert replicas[0].proc.returncode == -signal.SIGKILL
    assert killer.messages >= 1 and killer.cut is not None  # it started streaming, then the stream was cut
    assert info.attempts == 2 and info.target == replicas[1].address
    with RemoteTextEncoder(replicas[2].address, timeout=60) as single:
        expected = single.encode(prompts, max_sequence_length=512)
    assert got["prompt_embeds"].shape == (64, 512, 48) and set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name])


def test_all_replicas_down_one_clear_error_after_backoff():
    targets = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    started = time.monotonic()
    with RemoteTextEncoder(",".join(targets), timeout=5, retries=3, backoff=0.1) as enc:
        with pytest.raises(errors.ServerUnavailable) as info:
            enc.encode("nobody home")
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert all(t in message for t in targets) and "after 3 rounds of retries" in message
    assert elapsed >= 0.1 * 0.5 + 0.2 * 0.5  # backed off after rounds 1 and 2
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_all_replicas_down_cli_prints_one_line():
    targets = ",".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    result = run_cli("models", "--encoder", targets, "--timeout", "3")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and targets in lines[0], result.stderr
    assert "no encoder server answered" in lines[0], result.stderr


class _Status(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code,details,retried", [
    (grpc.StatusCode.UNAVAILABLE, "Stream removed (recvmsg:Connection reset by peer (104))", True),  # seen on kill -9
    (grpc.StatusCode.UNAVAILABLE, "Socket closed", True),
    (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", True),
    (grpc.StatusCode.UNKNOWN, "Stream removed", True),
    (grpc.StatusCode.INTERNAL, "internal error in /promptcast.v1.TextEncoder/Encode: ValueError: x", False),
    (grpc.StatusCode.INTERNAL, "model 'm' produced NaN or Inf in prompt_embeds", False),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", False),
    (grpc.StatusCode.INVALID_ARGUMENT, "prompts is empty", False),
    (grpc.StatusCode.UNAUTHENTICATED, "the token was not accepted", False),
])
def test_which_failures_are_rerequested_on_another_replica(code, details, retried):
    from denoiser_client.remote import _retriable

    assert _retriable(_Status(code, details)) is retried


def test_a_status_the_client_left_before_is_one_info_line_and_a_failed_write_stays_an_error(caplog):
    """gRPC logs an error when a call's final status cannot be sent because the client already went away (it
    cancelled, or its connection was cut, right after the last message): the server says so in one INFO line. A
    failed write of a message is not that case, and stays an error."""
    from grpc._cython import cygrpc

    from encoder_server.interceptors import ClientGoneFilter

    ClientGoneFilter.install()
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    with caplog.at_level(logging.INFO, logger="grpc._cython.cygrpc"):
        for operation in ("SendStatusFromServerOperation", "SendMessageOperation"):
            try:
                raise cygrpc.ExecuteBatchError(f'Failed "execute_batch": (<grpc._cython.cygrpc.{operation} object>,)')
            except cygrpc.ExecuteBatchError:
                grpc_log.exception("ExecuteBatchError raised in core by servicer method [%s]"
                                   % "/promptcast.v1.TextEncoder/Encode")
    status, write = [r for r in caplog.records if r.name == "grpc._cython.cygrpc"]
    assert status.levelno == logging.INFO and status.exc_info is None
    assert status.getMessage() == ("/promptcast.v1.TextEncoder/Encode: the client went away before the call's "
                                   "status could be sent")
    assert write.levelno == logging.ERROR and "ExecuteBatchError" in write.getMessage() and write.exc_info
