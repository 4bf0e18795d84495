"""`RemoteTextEncoder`: prompt embeddings from a promptcast encoder server, as diffusers wants them."""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.experimental
import torch

from denoiser_client import errors
from shared import published_memory as published, shared_memory as same_host
from shared.collate import STACK, Layout, batch_of, collate
from shared.promptcast.v1 import encoder_pb2 as pb, encoder_pb2_grpc as pb_grpc
from shared.tensor_codec import CACHE_STATUS_NAMES, COLLATE_NAMES, DTYPES, EmbeddingAssembler, decode_response
from shared.tensor_codec import PayloadError as _WirePayloadError

logger = logging.getLogger(__name__)
_RETRIABLE = {grpc.StatusCode.UNAVAILABLE}
# A replica killed mid-stream surfaces as UNAVAILABLE ("Stream removed", "Socket closed") or, depending on
# when the connection died, as INTERNAL/UNKNOWN with an HTTP/2 reset; both calls are idempotent (Encode
# by cache key), so those are re-requested whole on another replica too.
_CUT_STREAM = ("rst_stream", "socket closed", "stream removed", "connection reset", "goaway", "broken pipe",
               "stream terminated", "received http2 header with status")
_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": "promptcast.v1.TextEncoder"},
})


@dataclass(frozen=True)
class OutputInfo:
    """One output of a hosted model: its argument name, dtype, per-prompt shape (variable-length: the largest), whether
    its first axis is `fixed_tokens + max_sequence_length`, and how prompts are batched (`shared.collate.Layout`)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    per_token: bool
    fixed_tokens: int = 0
    layout: Layout = Layout()


@dataclass(frozen=True)
class ModelInfo:
    """What a server says about one hosted model (`RemoteTextEncoder.models()`)."""

    name: str
    family: str
    source: str
    fingerprint: str
    outputs: tuple[OutputInfo, ...]
    default_max_sequence_length: int
    max_max_sequence_length: int
    max_prompts_per_call: int

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> "ModelInfo":
        outputs = tuple(OutputInfo(o.name, DTYPES[o.dtype], tuple(o.shape), o.per_token, o.fixed_tokens,
                                   Layout(COLLATE_NAMES.get(o.collate, "stack"), o.mask_name)) for o in m.outputs)
        return cls(m.name, m.family, m.source, m.fingerprint, outputs, m.default_max_sequence_length,
                   m.max_max_sequence_length, m.max_prompts_per_call)

    def output(self, name: str) -> OutputInfo | None:
        return next((o for o in self.outputs if o.name == name), None)

    @property
    def layouts(self) -> dict[str, Layout]:
        """Output name -> how its prompts are batched (`shared.collate.collate` takes this)."""
        return {o.name: o.layout for o in self.outputs}


@dataclass
class EncodeInfo:
    """Per-call details from `encode(..., with_info=True)`."""

    cache_status: list[str]
    cache_keys: list[str]
    bytes_received: int = 0
    seconds: float = 0.0  # the whole call, as the client saw it
    server_seconds: float = 0.0  # the server's part: queue + encode for misses, lookup for hits
    target: str = ""
    attempts: int = 1
    request_id: str = ""  # sent as x-request-id; the server logs it with the call
    shared_memory: int = 0  # prompts whose bytes the server wrote into this process's shared memory


def _stub(channel: grpc.Channel) -> pb_grpc.TextEncoderStub:
    """The generated stub, except that `Encode` hands chunks over as views of gRPC's buffer (`decode_response`):
    the assembler copies each once, into its tensor, instead of protobuf copying it twice first."""
    stub = pb_grpc.TextEncoderStub(channel)
    stub.Encode = channel.unary_stream("/promptcast.v1.TextEncoder/Encode",
                                       request_serializer=pb.EncodeRequest.SerializeToString,
                                       response_deserializer=decode_response, _registered_method=True)
    return stub


class RemoteTextEncoder:
    r"""
    Client of a promptcast encoder server.

    Args:
        target (`str`):
            `host:port`, a comma list of them (tried in turn; a failed replica is skipped), or a gRPC
            name such as `dns:///encoder.default.svc:50051` (balanced with `round_robin`).
        token (`str`, *optional*):
            Bearer token sent as `authorization` metadata. Defaults to `$PROMPTCAST_TOKEN`.
        tls_ca (`str` or `os.PathLike`, *optional*):
            PEM file of the CA that signed the server certificate. Enables TLS.
        tls_cert (`str`, *optional*), tls_key (`str`, *optional*):
            Client certificate and key (PEM) for servers that require mTLS.
        timeout (`float`, *optional*, defaults to 60):
            Deadline of every call, in seconds.
        retries (`int`, *optional*, defaults to 4):
            Rounds over all targets for calls that fail with `UNAVAILABLE` (a dead, draining or
            warming replica) or whose stream was cut mid-way (re-requested whole on the next target).
        backoff (`float`, *optional*, defaults to 0.2):
            Seconds to wait after the first failed round; doubled after each further round (jittered).
        cache_dir (`str` or `os.PathLike`, *optional*):
            Keep embeddings in this folder on the node, keyed like the server's cache: a prompt seen
            before is read from disk with no network call at all (cache status `local`).
        shared_memory (`bool`, *optional*):
            Offer the server shared memory (`/dev/shm`) to write embeddings into instead of streaming them: a
            server on this host does, any other streams. Defaults to on for loopback targets (`localhost`,
            127.x, ::1, unix sockets) on Linux. A one-prompt call's tensors are then that memory itself, no copy.

    Example:
    ```py
    >>> enc = RemoteTextEncoder("localhost:50051")
    >>> embeds = enc.encode(["a cat"], model="tiny-flux1")
    >>> image = pipe(**embeds, num_inference_steps=4).images[0]
    ```
    """

    def __init__(self, target: str, *, token: str | None = None, tls_ca: str | os.PathLike | None = None,
                 tls_cert: str | os.PathLike | None = None, tls_key: str | os.PathLike | None = None,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 0.2,
                 cache_dir: str | os.PathLike | None = None, shared_memory: bool | None = None):
        self.targets = _split_targets(target)
        if timeout is None or not timeout > 0:
            raise errors.InvalidArgument(f"timeout={timeout!r}: every call needs a deadline, pass seconds > 0")
        self.timeout = timeout
        self.retries = max(1, retries)
        self.backoff = backoff
        token = token if token is not None else os.environ.get("PROMPTCAST_TOKEN")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        credentials = None
        self._tls = bool(tls_ca or tls_cert)
        if tls_ca or tls_cert:
            read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
            credentials = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
        # Keepalive pings find a dead link in ~40s even mid-encode, so a call on a vanished replica fails over.
        # Subchannels of its own (gRPC shares them process-wide by default): a new client for a server that was
        # down dials it at once, instead of inheriting a shared connection's reconnect backoff (up to two minutes).
        # Each `Encode` stream is read on the calling thread, not handed over from a thread of its own (gRPC's default).
        options = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
                   ("grpc.http2.max_pings_without_data", 0), ("grpc.use_local_subchannel_pool", 1),
                   ("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1),
                   (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
        self._channels = [grpc.secure_channel(t, credentials, options) if credentials
                          else grpc.insecure_channel(t, options) for t in self.targets]
        self._stubs = [_stub(c) for c in self._channels]
        self._next = 0
        self._models: dict[str, ModelInfo] | None = None
        self.local_cache = None
        shared_memory = any(map(same_host.is_loopback, self.targets)) if shared_memory is None else shared_memory
        self._arenas = same_host.ArenaPool() if shared_memory and same_host.supported() else None
        if cache_dir is not None:
            from denoiser_client.local_cache import LocalEmbeddingCache

            self.local_cache = LocalEmbeddingCache(cache_dir)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        if self._arenas is not None:
            self._arenas.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def models(self) -> list[ModelInfo]:
        """The models the server hosts, with their output names, dtypes and per-prompt shapes."""
        response = self._call(lambda stub: stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout,
                                                           metadata=self._metadata))[0]
        self._models = {m.name: ModelInfo.from_pb(m) for m in response.models}
        return list(self._models.values())

    def model_info(self, model: str | None = None) -> ModelInfo:
        """Info of `model`, or of the server's only model."""
        models = {m.name: m for m in self.models()} if self._models is None else self._models
        if model is None:
            if len(models) != 1:
                raise errors.InvalidArgument(f"the server hosts {sorted(models)}: pass model=")
            return next(iter(models.values()))
        if model not in models:
            raise errors.ModelNotFound(f"model {model!r} is not hosted by {self.target}; hosted: {sorted(models)}")
        return models[model]

    def health(self, timeout: float = 2.0) -> dict[str, str]:
        """Each target's health for the TextEncoder service, asked once with no retry: `SERVING`, `NOT_SERVING`
        (loading, draining, or a stuck device) or `UNREACHABLE` (no answer within `timeout` seconds)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        states = {}
        for target, channel in zip(self.targets, self._channels):
            request = health_pb2.HealthCheckRequest(service="promptcast.v1.TextEncoder")
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout, metadata=self._metadata)
                states[target] = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.RpcError as e:
                # The channel's own health checking fails every call on a NOT_SERVING server as "unhealthy".
                answered = e.code() == grpc.StatusCode.NOT_FOUND or "unhealthy" in (e.details() or "").lower()
                states[target] = "NOT_SERVING" if answered else "UNREACHABLE"
        return states

    @property
    def target(self) -> str:
        return ",".join(self.targets)

    def encode(self, prompt: str | list[str], model: str | None = None, *, prompt_2: str | list[str] | None = None,
               max_sequence_length: int | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, with_info: bool = False, collated: bool = True):
        r"""
        Encode prompts on the server.

        Args:
            prompt (`str` or `list[str]`): the prompt or prompts.
            model (`str`, *optional*): the hosted model's name; may be omitted when the server hosts one.
            prompt_2 (`str` or `list[str]`, *optional*): the second text encoder's prompt(s) (FLUX.1's T5, SD3's
                CLIP-G); defaults to `prompt`.
            max_sequence_length (`int`, *optional*): defaults to the model's default (FLUX.1-dev: 512).
            device (`str` or `torch.device`, *optional*): where to put the tensors (default: the CPU). diffusers
                does not move given embeddings, so a CUDA pipeline needs `device=pipe.device`.
            dtype (`torch.dtype`, *optional*): cast floating-point tensors to this (default: the server's dtype,
                the one diffusers produces there); a bf16 pipeline fed by an fp32 server needs `dtype=pipe.dtype`.
            with_info (`bool`, *optional*): also return an [`EncodeInfo`] (per prompt: cache status
                `miss`, `memory`, `disk`, `redis` or `local`, cache key...).
            collated (`bool`, *optional*, defaults to `True`): batch variable-length outputs as the pipeline takes
                them. `False` returns them as the server sends them, one tensor per prompt in a list, for a caller
                that batches groups of prompts itself (`shared.collate.collate` with `model_info(model).layouts`).

        Returns:
            `dict[str, torch.Tensor]`: tensors keyed by the diffusers call's argument names (`prompt_embeds`,
            `pooled_prompt_embeds`; Qwen-Image: `prompt_embeds` padded to the longest prompt and
            `prompt_embeds_mask`; Z-Image: `prompt_embeds` as a list of `(L_i, D)` tensors), so `pipe(**embeds)`
            works; `(embeddings, info)` with `with_info=True`.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts_2 = None if prompt_2 is None else ([prompt_2] if isinstance(prompt_2, str) else list(prompt_2))
        if prompts_2 is not None and len(prompts_2) != len(prompts):
            raise errors.InvalidArgument(f"prompt_2 has {len(prompts_2)} entries but prompt has {len(prompts)}")
        if self.local_cache is not None:
            tensors, info = self._encode_through_cache(prompts, model, prompts_2, max_sequence_length)
        else:
            tensors, info = self._encode_remote(prompts, model, prompts_2, max_sequence_length)
        if collated and any(isinstance(t, list) for t in tensors.values()):
            tensors = collate(tensors, self._layouts(model, tensors))
        if device is not None or dtype is not None:
            def move(t: torch.Tensor) -> torch.Tensor:
                return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

            tensors = {name: [move(x) for x in t] if isinstance(t, list) else move(t) for name, t in tensors.items()}
        return (tensors, info) if with_info else tensors

    def _layouts(self, model: str | None, tensors: dict) -> dict[str, Layout]:
        """How the model's outputs are batched (ListModels, asked once and kept; again if it lacks an output)."""
        layouts = self.model_info(model).layouts
        if not set(tensors) <= set(layouts):
            self._models = None  # the model changed under its name
            layouts = self.model_info(model).layouts
        return layouts

    def _encode_through_cache(self, prompts: list[str], model: str | None, prompts_2: list[str] | None,
                              max_sequence_length: int | None) -> tuple[dict, EncodeInfo]:
        """Hits from the node's cache, the rest from the server (then kept)."""
        started = time.perf_counter()
        info = self.model_info(model)  # cached after the first call: a full hit makes no RPC
        length = max_sequence_length or info.default_max_sequence_length
        keys = self.local_cache.keys(info.fingerprint, length, prompts, prompts_2)
        rows = {i: hit for i, key in enumerate(keys) if (hit := self.local_cache.get(key)) is not None}
        missing = [i for i in range(len(prompts)) if i not in rows]
        status, server_keys = ["local"] * len(prompts), list(keys)
        remote = EncodeInfo([], [], target="", attempts=0)
        if missing:
            tensors, remote = self._encode_remote([prompts[i] for i in missing], info.name,
                                                  None if prompts_2 is None else [prompts_2[i] for i in missing],
                                                  length)
            for j, i in enumerate(missing):
                rows[i] = {name: t[j] for name, t in tensors.items()}
                status[i], server_keys[i] = remote.cache_status[j], remote.cache_keys[j]
                self.local_cache.put(remote.cache_keys[j], rows[i])
            if server_keys != keys:
                self._models = None  # the model changed under its name: ask ListModels again next time
                logger.warning("the server at %s keyed a prompt differently from this client (model reloaded, or "
                               "another promptcast version); refreshing its model list", remote.target)
        if len(missing) == len(prompts):  # all from the server: already one batch, in order
            out = tensors
        else:  # as the server sends them: one-shape outputs stacked, variable-length ones a list per prompt
            layouts = info.layouts
            joined = batch_of([rows[i] for i in range(len(prompts))])
            out = {name: values if layouts.get(name, Layout()).collate != STACK else torch.stack(values)
                   for name, values in joined.items()}
        return out, EncodeInfo(status, server_keys, remote.bytes_received, time.perf_counter() - started,
                               remote.server_seconds, remote.target, remote.attempts, remote.request_id,
                               remote.shared_memory)

    def _encode_remote(self, prompts: list[str], model: str | None, prompts_2: list[str] | None,
                       max_sequence_length: int | None) -> tuple[dict, EncodeInfo]:
        request = pb.EncodeRequest(model=model or "", prompts=prompts, prompts_2=prompts_2 or [],
                                   max_sequence_length=max_sequence_length or 0)
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]  # the same on every retry: the servers' logs tie them together
        (tensors, headers, received), target, attempts = self._call(
            lambda stub: self._stream(stub, request, len(prompts), request_id))
        info = EncodeInfo([CACHE_STATUS_NAMES[h.cache_status] for h in headers], [h.cache_key for h in headers],
                          received, time.perf_counter() - started, max(h.server_seconds for h in headers),
                          target, attempts, request_id, sum(h.HasField("in_shared_memory") for h in headers))
        return tensors, info

    def _stream(self, stub, request, num_prompts, request_id: str = ""):
        # A fresh assembler (and arena) per attempt: a stream cut mid-way is re-requested whole, never stitched.
        arena = self._arenas.offer(request) if self._arenas is not None else None
        assembler = EmbeddingAssembler(num_prompts, shared=arena, lend=arena is not None and self._arenas.may_lend())
        received, ok = 0, False
        metadata = (*self._metadata, ("x-request-id", request_id)) if request_id else self._metadata
        try:
            for message in stub.Encode(request, timeout=self.timeout, metadata=metadata):
                received += message.nbytes if isinstance(message, memoryview) else message.ByteSize()
                assembler.feed(message)
            result, ok = assembler.result(), True
        finally:
            if arena is not None:  # kept for the next call only after a clean end: a server may still be writing
                self._arenas.give(arena, assembler.largest_prompt, ok)
        return result, assembler.headers, received + assembler.shared_bytes

    def _call(self, fn):
        """Run `fn(stub)`, moving to the next target on UNAVAILABLE (a dead or draining replica, a cut
        stream), with exponential backoff after each round over all targets."""
        last: grpc.RpcError | published.SlabGone | None = None
        attempts = self.retries * len(self._stubs)
        for attempt in range(attempts):
            index = (self._next + attempt) % len(self._stubs)
            try:
                result = fn(self._stubs[index])
                self._next = index
                return result, self.targets[index], attempt + 1
            except grpc.RpcError as e:
                if not _retriable(e):
                    raise errors.from_rpc_error(e, self.targets[index]) from None
                last = e
            except _WirePayloadError as e:
                raise errors.PayloadError(f"bad embedding stream from {self.targets[index]}: {e}") from None
            except published.SlabGone as e:  # unlinked by the server before this client read it: asked again
                last = e
                continue
            if (attempt + 1) % len(self._stubs) == 0 and attempt + 1 < attempts:  # a round failed: back off
                time.sleep(self.backoff * 2 ** (attempt // len(self._stubs)) * (0.5 + random.random()))
        detail = str(last) if isinstance(last, published.SlabGone) else (last.details() or last.code().name) if last \
            else "none"
        raise errors.ServerUnavailable(
            f"no encoder server answered at {self.target} after {self.retries} rounds of retries "
            f"(last error: {detail}); {errors.unavailable_hint(detail, self._tls)}", grpc.StatusCode.UNAVAILABLE) from None


def _retriable(error: grpc.RpcError) -> bool:
    code = error.code()
    if code in _RETRIABLE:
        return True
    details = (error.details() or "").lower()
    return code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and any(s in details for s in _CUT_STREAM)


def _split_targets(target: str) -> list[str]:
    if "://" in target or target.startswith(("dns:", "unix:", "ipv4:", "ipv6:")):
        return [target]
    targets = [t.strip() for t in target.split(",") if t.strip()]
    if not targets:
        raise errors.InvalidArgument("the encoder target is empty: pass host:port")
    return targets
