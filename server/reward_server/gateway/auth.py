"""Bearer API keys on the front: every route answers 401 {"error": "Unauthorized"} (vLLM's and
SGLang's answer) without `Authorization: Bearer KEY`, except health checks and metrics (the gRPC
front, launcher/grpc_front.py, checks the same keys). Keys come from a file (one per line) or
$REWARD_API_KEY, never the command line; they are compared as SHA-256 digests in constant time
(vLLM's way) and never logged."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from reward_server.gateway.common import METRICS, Handler
from reward_server.launcher.front import api_of

API_KEY_ENV = "REWARD_API_KEY"
OPEN_PREFIXES = ("/health", "/metrics", "/v1/health/")  # and KServe's health API (front.api_of)


def read_api_keys(path: Path | None, environ: dict[str, str] | os._Environ = os.environ) -> tuple[str, ...]:
    """Keys from `path` (one per line; blank lines and # comments skipped) or $REWARD_API_KEY."""
    if path is not None:
        keys = tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.lstrip().startswith("#"))
        if not keys:
            raise ValueError(f"{path}: no API key in it")
        return keys
    key = environ.get(API_KEY_ENV, "").strip()
    return (key,) if key else ()


class ApiKeys:
    """The configured keys, kept as SHA-256 digests only."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def accept(self, authorization: str | None) -> bool:
        """Whether an `Authorization` value is `Bearer KEY` (scheme in any case) with one of the keys."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()  # aiohttp decodes bytes that are no UTF-8 so
        return any([hmac.compare_digest(digest, d) for d in self.digests])  # all compared: no early exit


def middleware(keys: Sequence[str]):
    api_keys = ApiKeys(keys)

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        open_path = request.method == "OPTIONS" or path.startswith(OPEN_PREFIXES) or api_of(path) == "health"
        if open_path or api_keys.accept(request.headers.get("Authorization")):
            return await handler(request)
        resource = request.match_info.route.resource  # its pattern, not the path: labels stay few
        request.app[METRICS].errors.labels(resource.canonical if resource else "other", "unauthorized").inc()
        return web.json_response({"error": "Unauthorized"}, status=401)

    return check_key
