"""The public HTTP front: the only HTTP server clients reach; tritonserver's HTTP and metrics listen
on loopback behind it (gRPC stays Triton's own, on the public address).

Why: Triton 2.51's HTTP server (libevhtp) parses a body sent as `application/x-www-form-urlencoded`
to a URI without a query string into two stack buffers of the body's size, so a body over about half
the thread stack (4 MiB with an 8 MiB stack) kills the whole server with SIGSEGV, on any path
(triton-inference-server/server#5840; no release fixes it). So the front:
- caps request bodies (`max_body_bytes`: 413 naming the limit, before anything reaches Triton);
- never hands Triton a form-urlencoded body: KServe JSON sent with that type (what `curl -d` sends)
  is forwarded as `application/json`; every other body, query string and end-to-end header goes
  unchanged (the binary-tensor extension included), responses are streamed back;
- forwards only the KServe v2 paths it knows, and refuses the restricted APIs (`RESTRICTED`) with 403
  unless an admin key is configured and the request carries it (`admin-key: KEY`); Triton's loopback
  HTTP restricts the same APIs with the same key (a random one when none is configured);
- serves the metrics port: Triton's exposition (from loopback) followed by the front's own metrics.

Routes: `application(...)` builds the app; further routes (the RLHF gateway's
`reward_server.gateway.install(app, ...)`) are added through its `install` hooks, which run before the
KServe passthrough, a catch-all that is added last. TLS for HTTP: `server_context` (serve.py).
"""

from __future__ import annotations

import hmac
import re
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
import prometheus_client
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

ADMIN_HEADER = "admin-key"  # gRPC metadata keys are lower case; HTTP headers match case-insensitively
MAX_BODY_BYTES = 16 << 20  # default cap: above the 1 MiB conversation limit, far below evhtp's crash (~4 MiB)
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
CATCH_ALL = "/{tail:.*}"
# Restricted APIs, in Triton's own names (its --http-restricted-api / --grpc-restricted-protocol).
RESTRICTED = ("model-repository", "logging", "trace", "shared-memory", "statistics")

_MODEL = r"/v2/models/[^/]+(?:/versions/[0-9]+)?"
# Triton 2.51's HTTP API, path -> API name; anything else is answered 404 here.
APIS = [  # first match wins: /v2/models/stats is statistics, not a model named "stats"
    (re.compile(rf"(?:/v2/models|{_MODEL})/stats"), "statistics"),
    (re.compile(r"/v2/health/(?:live|ready)"), "health"),
    (re.compile(rf"{_MODEL}/ready"), "health"),
    (re.compile(r"/v2"), "metadata"),
    (re.compile(_MODEL), "metadata"),
    (re.compile(rf"{_MODEL}/config"), "model-config"),
    (re.compile(rf"{_MODEL}/(?:infer|generate|generate_stream)"), "inference"),
    (re.compile(r"/v2/repository/.*"), "model-repository"),
    (re.compile(r"/v2/(?:system|cuda)sharedmemory(?:/.*)?"), "shared-memory"),
    (re.compile(r"/v2/logging"), "logging"),
    (re.compile(rf"(?:/v2|{_MODEL})/trace/setting"), "trace"),
]
# Connection-level headers (RFC 9110 7.6.1), never forwarded; Host, Content-Length and Content-Type are set anew.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer"}
HOP_BY_HOP |= {"transfer-encoding", "upgrade", "host", "content-length", "content-type", "expect"}

prometheus_client.disable_created_metrics()

UPSTREAM = web.AppKey("upstream", str)  # Triton's loopback endpoint, http://127.0.0.1:PORT
SESSION = web.AppKey("session", aiohttp.ClientSession)
ADMIN_KEY = web.AppKey("admin_key", str)  # "" when none is configured
LIMIT = web.AppKey("max_body_bytes", int)  # no *_created series beside Triton's


def api_of(path: str) -> str | None:
    """The Triton API a raw request path belongs to, or None (not forwarded)."""
    if any(segment in (".", "..") for segment in path.split("/")):
        return None  # never let a URL library or Triton resolve dot segments into another API
    return next((name for pattern, name in APIS if pattern.fullmatch(path)), None)


def server_context(cert_file: str, key_file: str, client_ca_file: str | None = None) -> ssl.SSLContext:
    """TLS 1.2+ server context; with `client_ca_file`, clients must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass
class FrontMetrics:
    """The front's own metrics, in a registry of its own, appended to Triton's on the metrics port."""

    registry: prometheus_client.CollectorRegistry = field(default_factory=prometheus_client.CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = prometheus_client.Counter(
            "reward_http_requests", "HTTP requests answered by the front, by API and status", ["api", "code"], registry=self.registry
        )
        self.too_large = prometheus_client.Counter(
            "reward_http_bodies_too_large", "HTTP request bodies refused over --max-body-bytes", registry=self.registry
        )

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


METRICS = web.AppKey("metrics", FrontMetrics)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)  # Triton's own error shape


def _api_label(request: web.Request) -> str:
    """A bounded label: the Triton API (passthrough), or the pattern of the route that answered."""
    route = request.match_info.route
    if route.handler is passthrough or route.resource is None:
        return api_of(request.raw_path.split("?", 1)[0]) or "unknown"
    return route.resource.canonical


@web.middleware
async def _count(request: web.Request, handler) -> web.StreamResponse:
    metrics: FrontMetrics = request.app[METRICS]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        metrics.requests.labels(_api_label(request), str(exc.status)).inc()
        raise
    metrics.requests.labels(_api_label(request), str(response.status)).inc()
    return response


@web.middleware
async def _cap_body(request: web.Request, handler) -> web.StreamResponse:
    """Refuse a declared oversized body before reading it; `read_body` catches undeclared (chunked) ones."""
    limit = request.app[LIMIT]
    if request.content_length is not None and request.content_length > limit:
        return too_large(request, request.content_length)
    return await handler(request)


def too_large(request: web.Request, size: int | None) -> web.Response:
    request.app[METRICS].too_large.inc()
    limit = request.app[LIMIT]
    size_text = f"{size} bytes" if size is not None else "more bytes"
    response = _error(413, f"request body of {size_text} is over the limit of {limit} bytes (the server's --max-body-bytes)")
    response.force_close()  # the unread rest of the body must not be parsed as the next request
    return response


async def read_body(request: web.Request) -> bytes | web.Response:
    """The whole request body, decoded as its Content-Encoding says (aiohttp does it; the limit counts the
    decoded bytes), or a 413 response when it is over the limit (never read past it), or a 400 when it does
    not decode."""
    limit, chunks, size = request.app[LIMIT], [], 0
    try:
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                return too_large(request, None)
            chunks.append(chunk)
    except web.RequestPayloadError as exc:  # a body its Content-Encoding cannot decode
        return _error(400, f"request body: {exc.args[0] if exc.args else exc}")
    return b"".join(chunks)


def forwarded_content_type(content_type: str) -> str:
    """evhtp parses a form-urlencoded body on the stack (module docstring); KServe bodies are JSON or binary."""
    return JSON if content_type.strip().lower().startswith(FORM) else content_type


def _forwarded_headers(request: web.Request) -> CIMultiDict:
    """The request's end-to-end headers, less: those its Connection header names (RFC 9110 7.6.1), its
    Content-Encoding (aiohttp has decoded the body already), and Authorization (the front's API key: it
    never reaches tritonserver, docs/security.md)."""
    named = {token.strip().lower() for value in request.headers.getall("Connection", []) for token in value.split(",")}
    dropped = HOP_BY_HOP | named | {"content-encoding", "authorization"}
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in dropped)
    if "Content-Type" in request.headers:
        headers["Content-Type"] = forwarded_content_type(request.headers["Content-Type"])  # exactly one
    return headers


def _admitted(request: web.Request) -> bool:
    key = request.app[ADMIN_KEY]
    given = request.headers.get(ADMIN_HEADER)
    return bool(key) and given is not None and hmac.compare_digest(given.encode(), key.encode())


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Forward a KServe v2 request to Triton's loopback HTTP and stream its answer back."""
    path = request.raw_path.split("?", 1)[0]
    api = api_of(path)
    if api is None:
        return _error(404, f"no such endpoint: {request.method} {path}")
    if api in RESTRICTED and not _admitted(request):
        configured = "send the server's admin key in the 'admin-key' header" if request.app[ADMIN_KEY] else "no admin key is configured"
        return _error(403, f"This API is restricted, expecting header '{ADMIN_HEADER}' (the {api} API; {configured})")  # Triton's words
    body = await read_body(request) if request.body_exists else None
    if isinstance(body, web.Response):
        return body
    session: aiohttp.ClientSession = request.app[SESSION]
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)  # as sent: not re-quoted, no dot segments resolved
    try:
        upstream = await session.request(request.method, url, headers=_forwarded_headers(request), data=body, allow_redirects=False)
    except aiohttp.ClientConnectionError:
        return _error(503, "the inference server is not available (restarting?); retry")
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend((k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP or k.lower() == "content-type")
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(1 << 16):
            await response.write(chunk)
        await response.write_eof()
    return response


async def _session(app: web.Application):
    # One pooled session to Triton; bodies pass through as they are (no decompression, no timeout on long inferences).
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    # Accept-Encoding only as the client sent it (aiohttp would add gzip: Triton then compresses for a client
    # that never asked); no limit on connections (aiohttp's 100 queued health probes behind long inferences).
    connector = aiohttp.TCPConnector(limit=0)
    auto = ("User-Agent", "Accept-Encoding")
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False, skip_auto_headers=auto) as session:
        app[SESSION] = session
        yield


def application(
    upstream: str,
    *,
    admin_key: str | None,
    max_body_bytes: int = MAX_BODY_BYTES,
    metrics: FrontMetrics | None = None,
    install: Iterable[Callable[[web.Application], None]] = (),
) -> web.Application:
    """The public HTTP app in front of Triton's loopback HTTP at `upstream` (http://127.0.0.1:PORT).

    `install`: hooks that add routes (the gateway's `reward_server.gateway.install`); they run before
    the KServe passthrough is added, as the catch-all it is, so their routes take precedence."""
    app = web.Application(middlewares=[_count, _cap_body], client_max_size=max_body_bytes)
    app[UPSTREAM], app[ADMIN_KEY], app[LIMIT] = upstream.rstrip("/"), admin_key or "", max_body_bytes
    app[METRICS] = metrics or FrontMetrics()
    app.cleanup_ctx.append(_session)
    for hook in install:
        hook(app)
    app.router.add_route("*", CATCH_ALL, passthrough)  # last: the KServe v2 API
    return app


async def _metrics(request: web.Request) -> web.Response:
    """Triton's exposition, then the front's own; 503 while Triton's metrics service is down."""
    try:
        async with request.app[SESSION].get(request.app[UPSTREAM] + "/metrics") as upstream:
            triton = await upstream.read()
            status = upstream.status
    except aiohttp.ClientConnectionError:
        return _error(503, "the inference server's metrics are not available (restarting?)")
    if status != 200:
        return _error(503, f"the inference server's metrics answered {status}")
    body = triton if triton.endswith(b"\n") or not triton else triton + b"\n"
    return web.Response(body=body + request.app[METRICS].exposition(), headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


def metrics_application(upstream: str, metrics: FrontMetrics, max_body_bytes: int = MAX_BODY_BYTES) -> web.Application:
    """The public metrics app: GET /metrics only (no body ever reaches Triton's metrics service)."""
    app = web.Application(middlewares=[_count, _cap_body], client_max_size=max_body_bytes)
    app[UPSTREAM], app[METRICS], app[LIMIT], app[ADMIN_KEY] = upstream.rstrip("/"), metrics, max_body_bytes, ""
    app.cleanup_ctx.append(_session)
    app.router.add_get("/metrics", _metrics)
    return app


async def start(app: web.Application, address: str, port: int, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    """Serve `app` on address:port; `await runner.cleanup()` stops it."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address, port, ssl_context=ssl_context, reuse_address=True).start()
    return runner
