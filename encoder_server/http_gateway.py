"""The HTTP gateway (`promptcast serve --http-port`): the door of Hugging Face's hosted FLUX.2 text encoder, in front
of the same `EmbeddingService` as gRPC (batcher, cache tiers, limits, tokens, TLS files, metrics, request log).

* `POST /predict`, body `{"prompt": str or [str], "model"?}`: the `torch.save` bytes of `prompt_embeds` (B, L, D),
  as the hosted endpoint answers (a model whose prompts each have their own length, Qwen-Image or Z-Image, takes one
  prompt a call there: one tensor cannot hold several); with `Accept: application/vnd.safetensors`, a safetensors
  file of every output.
* `POST /v1/encode`, body `{"model"?, "prompts", "prompts_2"?, "max_sequence_length"?}`: a safetensors file of every
  output, with each prompt's cache status and key in its metadata.

A safetensors answer holds each output as the pipeline takes the batch: one-shape outputs stacked `(B, ...)`; a
padded one (Qwen-Image) zero-padded to the longest prompt with its mask beside it (`prompt_embeds_mask`); a list one
(Z-Image), which safetensors cannot hold as a list, as one tensor per prompt at its own length, `NAME.0`, `NAME.1`...
The metadata's `collate` names each output's form (`stack`, `pad` or `list`).
* `GET /healthz`: 200 while SERVING, 503 otherwise.

Errors are JSON `{"error": message, "code": gRPC status name}` with the HTTP status of the same domain error. The
body is bounded (`max_body_bytes`, from the request limits): a bigger `Content-Length` is refused (413) before any
byte of the body is read, a chunked body as soon as it passes the bound.

uvicorn runs on the gRPC server's own event loop; the encoder server owns the signals and drains both doors.
`torch.save` bytes are written for the hosted endpoint's clients only: nothing in promptcast unpickles anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import ssl

import torch

from encoder_server.errors import EncoderServerError, InvalidInput, RequestTooLarge, Unauthenticated
from encoder_server.metrics import request_id
from encoder_server.service import Limits
from shared.collate import LIST, PAD, pad

INSTALL_HINT = "pip install 'promptcast[http]' (or: pip install starlette uvicorn)"
try:
    import uvicorn
    from safetensors.torch import save as safetensors_bytes
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
except ImportError as e:  # pragma: no cover - the CLI checks first and prints one line
    raise ImportError(f"the HTTP gateway (--http-port) needs starlette and uvicorn, and {e.name} is missing: "
                      f"{INSTALL_HINT}") from e

logger = logging.getLogger(__name__)

SAFETENSORS = "application/vnd.safetensors"
TORCH_SAVE = "application/octet-stream"
PREDICT_FIELDS = {"prompt", "model"}
ENCODE_FIELDS = {"model", "prompts", "prompts_2", "max_sequence_length"}


def max_body_bytes(limits: Limits) -> int:
    """The largest body a request within `limits` needs: every prompt and prompt_2 at the longest accepted length,
    each character written as a 6-byte JSON escape (`\\u00e9`), plus room for the other fields."""
    return 2 * limits.max_prompts_per_call * (6 * limits.max_prompt_chars + 8) + (64 << 10)


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class _Server(uvicorn.Server):
    def capture_signals(self):
        # SIGTERM/SIGINT belong to the encoder server, which drains gRPC and HTTP together; uvicorn would replace
        # its handlers (and re-raise the signal on exit).
        return contextlib.nullcontext()


class HttpGateway:
    r"""
    HTTP routes over an `EmbeddingService`, served by uvicorn on the running event loop.

    Args:
        service (`EmbeddingService`): the domain the gRPC servicer calls too.
        metrics (`ServerMetrics`): every call is recorded with `metrics.call(...)` (methods `HTTP/predict`,
            `HTTP/v1/encode`); health checks are not.
        host (`str`), port (`int`): where to listen; port 0 picks a free one. Bound at once (`self.port`).
        serving (`Callable[[], bool]`): whether health is SERVING now.
        auth (`TokenAuth`, *optional*): when given, every route but `/healthz` needs
            `Authorization: Bearer <token>`.
        tls_cert (`str`), tls_key (`str`), tls_client_ca (`str`), *optional*: serve HTTPS (and require client
            certificates signed by `tls_client_ca`), from the gRPC server's PEM files.
        executor (`concurrent.futures.Executor`, *optional*): where answers are serialized, off the event loop.
    """

    def __init__(self, service, metrics, *, host: str, port: int, serving, auth=None, tls_cert=None, tls_key=None,
                 tls_client_ca=None, executor=None):
        self.service, self.metrics, self.auth, self.serving, self.executor = service, metrics, auth, serving, executor
        self.active = 0  # calls being handled: what a drain waits for
        self.max_body = max_body_bytes(service.limits)
        routes = [Route("/predict", self.predict, methods=["POST"]), Route("/v1/encode", self.encode, methods=["POST"]),
                  Route("/healthz", self.healthz, methods=["GET"])]
        app = Starlette(routes=routes, exception_handlers={HTTPException: _route_error})
        tls = {}
        if tls_cert:
            tls = dict(ssl_certfile=tls_cert, ssl_keyfile=tls_key, ssl_ca_certs=tls_client_ca,
                       ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE)
        self.scheme = "https" if tls_cert else "http"
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, http="h11",
                                timeout_graceful_shutdown=5, **tls)
        config.load()  # a bad certificate or key fails here, before any model loads
        self._server = _Server(config)
        self._socket = _bind(host, port)
        self.port = self._socket.getsockname()[1]
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._socket]),
                                                            name="http-gateway")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # it failed to start: raise why

    async def stop(self) -> None:
        """Close the port and every connection (the caller has let in-flight calls finish)."""
        if self._task is None:
            self._socket.close()
            return
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)

    async def healthz(self, request: Request) -> Response:
        serving = self.serving()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, 200 if serving else 503)

    async def predict(self, request: Request) -> Response:
        return await self._handle(request, "HTTP/predict", self._predict)

    async def encode(self, request: Request) -> Response:
        return await self._handle(request, "HTTP/v1/encode", self._encode)

    async def _predict(self, request: Request, call) -> Response:
        body = await self._json(request, PREDICT_FIELDS)
        prompts, model = _texts(body, "prompt", single=True), _name(body)
        call.describe(model, len(prompts))
        safetensors = _accepts(request.headers.get("accept", ""), SAFETENSORS)
        # Before any encoding; a server still warming has no models to ask, and `encode` says it is warming.
        if not safetensors and len(prompts) > 1 and self.service.ready \
                and "prompt_embeds" in self.service.variable_outputs(model):
            encoder = self.service.model(model)
            raise InvalidInput(f"model {encoder.name!r} ({encoder.family}) gives each prompt its own length, and the "
                               f"torch.save answer is one tensor: send one prompt a call, or {len(prompts)} with "
                               f"'Accept: {SAFETENSORS}' (or POST /v1/encode)")
        embeddings = await self._unless_gone(request, self.service.encode(model, prompts))
        if safetensors:
            return await self._safetensors(self.service.model(model), embeddings)
        data = await self._off_loop(lambda: _torch_save(_stacked(_rows(embeddings), ["prompt_embeds"])["prompt_embeds"]))
        return Response(data, media_type=TORCH_SAVE, headers=_cache_headers(embeddings))

    async def _encode(self, request: Request, call) -> Response:
        body = await self._json(request, ENCODE_FIELDS)
        prompts, model = _texts(body, "prompts"), _name(body)
        prompts_2 = _texts(body, "prompts_2") if body.get("prompts_2") is not None else None
        length = body.get("max_sequence_length") or 0
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise InvalidInput(f"max_sequence_length={json.dumps(length)[:40]} must be a whole number of tokens "
                               "(0 or absent: the model's default)")
        call.describe(model, len(prompts))
        embeddings = await self._unless_gone(request, self.service.encode(model, prompts, prompts_2, length))
        return await self._safetensors(self.service.model(model), embeddings, length)

    async def _handle(self, request: Request, method: str, respond) -> Response:
        """Run `respond(request, call)` inside the call's record: the token check, the one error mapping, the
        request id and the bytes sent."""
        rid = request_id([("x-request-id", request.headers.get("x-request-id", ""))])
        peer = f"{self.scheme}:{request.client.host}:{request.client.port}" if request.client else ""
        self.active += 1
        try:
            with self.metrics.call(method, rid, peer=peer, encodes=True) as call:
                try:
                    if self.auth is not None and (reason := self.auth.refusal(request.headers.get("authorization"))):
                        raise Unauthenticated(reason)
                    response = await respond(request, call)
                except (_ClientGone, ClientDisconnect):
                    call.code = "CANCELLED"
                    return Response(status_code=499)  # nobody reads it; uvicorn drops it
                except Exception as e:  # noqa: BLE001 - every error gets a status, the unexpected ones a log line
                    status, call.code, message = error_status(e, method)
                    response = error_response(status, call.code, message)
                call.sent(response.body)
                response.headers["x-request-id"] = rid
                return response
        finally:
            self.active -= 1

    async def _json(self, request: Request, fields: set[str]) -> dict:
        """The body as a JSON object with only `fields`, read within the body bound."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large(f"Content-Length {declared}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_body:
                raise self._too_large("the body")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise InvalidInput(f"the body is not JSON ({e}): send an object such as {{\"prompt\": \"a red fox\"}} "
                               "with Content-Type: application/json") from None
        if not isinstance(body, dict):
            raise InvalidInput(f"the body is a JSON {type(body).__name__}, it must be an object such as "
                               "{\"prompt\": \"a red fox\"}")
        unknown = sorted(set(body) - fields)
        if unknown:
            raise InvalidInput(f"unknown field {unknown[0]!r} for {request.url.path}; it takes {sorted(fields)}")
        return body

    def _too_large(self, what: str) -> RequestTooLarge:
        return RequestTooLarge(f"{what} is over {self.max_body} bytes, the most a request within this server's limits "
                               "needs (--max-prompts-per-call, --max-prompt-chars); split the request")

    async def _unless_gone(self, request: Request, work):
        """`await work`, cancelled if the client disconnects first: a request nobody waits for leaves its batch
        (dropped before GPU work when it was the only one waiting)."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()  # the client left, or this call itself was cancelled: nobody waits for the answer
        if task not in done:
            raise _ClientGone()
        return task.result()

    async def _safetensors(self, encoder, embeddings, max_sequence_length: int = 0) -> Response:
        metadata = {"model": encoder.name, "family": encoder.family, "fingerprint": encoder.fingerprint,
                    "max_sequence_length": str(max_sequence_length or encoder.default_max_sequence_length),
                    "cache_status": json.dumps([e.cache_status for e in embeddings]),
                    "cache_keys": json.dumps([e.key for e in embeddings])}
        layouts = {o.name: o.layout for o in encoder.outputs}
        metadata["collate"] = json.dumps({o.name: o.layout.collate for o in encoder.outputs}, sort_keys=True)
        data = await self._off_loop(lambda: safetensors_bytes(_batched(_rows(embeddings), layouts), metadata))
        return Response(data, media_type=SAFETENSORS, headers=_cache_headers(embeddings))

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def error_status(error: Exception, method: str) -> tuple[int, str, str]:
    """The one mapping of errors to answers: (HTTP status, gRPC code name, message) of a domain error; anything else
    is 500 INTERNAL, logged."""
    if isinstance(error, EncoderServerError):
        return error.http_status, error.code.name, str(error)
    logger.exception("unexpected error in %s", method, exc_info=error)
    return 500, "INTERNAL", f"internal error in {method}: {type(error).__name__}: {error}"


def error_response(status: int, code: str, message: str) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    if status == 413:
        headers["connection"] = "close"  # the rest of an oversize body is never read: the connection is not reused
    return JSONResponse({"error": message, "code": code}, status, headers=headers)


async def _route_error(request: Request, error: HTTPException) -> JSONResponse:
    """Unknown paths and methods answer in the same JSON form as every other error."""
    if error.status_code == 405:
        return error_response(405, "UNIMPLEMENTED", f"{request.method} is not served on {request.url.path}")
    if error.status_code == 404:
        return error_response(404, "NOT_FOUND", f"no route {request.url.path}: POST /predict or /v1/encode, "
                                                "GET /healthz")
    return error_response(error.status_code, "INVALID_ARGUMENT", str(error.detail))


async def _disconnected(request: Request) -> None:
    # With the body read, the next ASGI message is the disconnect (uvicorn sends it when the client hangs up).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _texts(body: dict, field: str, single: bool = False) -> list[str]:
    value = body.get(field)
    if single and isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        want = "a string or a list of strings" if single else "a list of strings"
        got = "missing" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
        raise InvalidInput(f"{field!r} is {got}, it must be {want}")
    return value


def _name(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidInput(f"'model' is {type(model).__name__}, it must be a model name (a string) or absent")
    return model or None


def _accepts(header: str, media_type: str) -> bool:
    for part in header.split(","):
        name, *params = (p.strip() for p in part.split(";"))
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            if name.lower() == media_type and float(q) > 0:
                return True
        except ValueError:
            continue
    return False


def _rows(embeddings) -> list[dict[str, torch.Tensor]]:
    """Each prompt's tensors (a memory hit is rebuilt from its wire form: a copy, made off the event loop)."""
    return [e.tensor_dict() for e in embeddings]


def _batched(prompts: list[dict[str, torch.Tensor]], layouts) -> dict[str, torch.Tensor]:
    """Every output of the prompts' tensors in its safetensors form: stacked, padded with its mask, or one tensor a
    prompt (`NAME.i`)."""
    out = _stacked(prompts, [n for n in prompts[0] if layouts[n].collate not in (PAD, LIST)])
    for name in prompts[0]:
        layout = layouts[name]
        rows = [p[name] for p in prompts]
        if layout.collate == LIST:
            out.update({f"{name}.{i}": row.contiguous() for i, row in enumerate(rows)})
        elif layout.collate == PAD:
            out[name], mask = pad(rows)
            if layout.mask:
                out[layout.mask] = mask
    return out


def _stacked(prompts: list[dict[str, torch.Tensor]], names) -> dict[str, torch.Tensor]:
    """(B, ...) tensors that own exactly their bytes: torch.save writes a tensor's whole storage, and a miss's row is
    a view of its whole batch. One prompt whose row already owns its storage (a rebuilt memory hit) is not copied."""
    out = {}
    for name in names:
        rows = [p[name] for p in prompts]
        row = rows[0]
        owns = row.is_contiguous() and row.storage_offset() == 0 and row.untyped_storage().nbytes() == row.nbytes
        out[name] = row.unsqueeze(0) if len(rows) == 1 and owns else torch.stack(rows)
    return out


def _torch_save(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def _cache_headers(embeddings) -> dict[str, str]:
    return {"x-cache-status": ",".join(e.cache_status for e in embeddings)}


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"--http-port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.setblocking(False)
    return sock
