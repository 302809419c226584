"""What every gateway route shares: options, errors, per-route metrics, and scoring items through
the project's async client (one ensemble request per item, all in flight at once)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from reward_client import AsyncRewardClient, Score, protocol
from reward_client.errors import (
    InvalidConversationError,
    PermissionDeniedError,
    RequestTimeoutError,
    RewardClientError,
    ServerUnavailableError,
)

CLIENT = web.AppKey("reward_gateway_client", AsyncRewardClient)
OPTIONS = web.AppKey("reward_gateway_options", object)
METRICS = web.AppKey("reward_gateway_metrics", object)
MAX_ITEMS = 4096  # inputs of one /get_reward, /classify or /pooling request (docs/gateway.md)
NO_LIMIT = 2**31 - 1  # KEEP_LAST_TOKENS for "cut to the server's max_tokens" (vLLM's truncate_prompt_tokens -1)


@dataclass(frozen=True)
class Options:
    """How the gateway answers. `api_keys`: bearer keys every inference route needs (none: open);
    `raw`: OpenRLHF text in no known chat format is scored as given instead of refused;
    `model_name`: the name the OpenAI/vLLM routes answer with (any requested name is accepted);
    `normalize`: (mean, std) applied to /get_reward's rewards as OpenRLHF's normalize_reward does;
    `max_tokens`: the ensemble's limit, reported by /v1/models."""

    api_keys: tuple[str, ...] = ()
    raw: bool = False
    model_name: str = protocol.ENSEMBLE_MODEL
    normalize: tuple[float, float] | None = None
    max_tokens: int | None = None
    registry: CollectorRegistry = field(default=REGISTRY, repr=False)


class GatewayError(Exception):
    """An answer other than 200: status, message and the reason it is counted under."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


def bad_request(message: str, reason: str = "malformed") -> GatewayError:
    return GatewayError(400, message, reason)


class Metrics:
    """Per-route requests, errors by reason and latency, on the front's prometheus registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("reward_gateway_requests", "Gateway requests, by route", ["route"], registry=registry)
        self.errors = Counter(
            "reward_gateway_errors", "Gateway requests answered with an error, by route and reason", ["route", "reason"], registry=registry
        )
        self.latency = Histogram(
            "reward_gateway_request_duration_seconds",
            "Gateway request latency, by route",
            ["route"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180),
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


ENVELOPE = web.RequestKey("reward_gateway_envelope", object)  # a request's own error shape, where one path serves two formats


def route(name: str, envelope: Callable[[GatewayError], Any] | None = None) -> Callable[[Handler], Handler]:
    """A handler counted under `name`, its GatewayErrors answered as JSON (`envelope`: the body of
    an error in that route's format; default vLLM's/OpenAI's {"error": {...}})."""
    shape = envelope or openai_error

    def wrap(handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.StreamResponse:
            metrics = request.app[METRICS]
            metrics.requests.labels(name).inc()
            start = time.perf_counter()
            try:
                return await handler(request)
            except GatewayError as exc:
                metrics.errors.labels(name, exc.reason).inc()
                return web.json_response(request.get(ENVELOPE, shape)(exc), status=exc.status)
            finally:
                metrics.latency.labels(name).observe(time.perf_counter() - start)

        return counted

    return wrap


def openai_error(exc: GatewayError) -> dict[str, Any]:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 503: "ServiceUnavailableError", 504: "TimeoutError"}
    return {"error": {"message": str(exc), "type": kind.get(exc.status, "InternalServerError"), "param": None, "code": exc.status}}


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; 400 otherwise."""
    try:
        body = json.loads(await request.read())
    except web.RequestPayloadError as exc:  # a body its Content-Encoding cannot decode
        raise bad_request(f"body: {exc.args[0] if exc.args else exc}", "encoding") from None
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep, an integer of > 4,300 digits
        raise bad_request(f"body: not valid JSON ({exc})", "encoding") from None
    if not isinstance(body, dict):
        raise bad_request(f"body: expected a JSON object, got {type(body).__name__}")
    return body


def optional(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise bad_request(f"{key}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def request_items(values: Sequence[Any], make: Callable[[int, Any], dict[str, np.ndarray]], what: str) -> list[dict[str, np.ndarray]]:
    """Each value's request tensors (`make(index, value)`), at most MAX_ITEMS of them: a value the client's
    checks refuse is the request's 400, named `what[i]` (one coroutine and its tensors per item: the count
    bounds the memory one request takes, where a 16 MiB body of tiny items would otherwise take gigabytes)."""
    if len(values) > MAX_ITEMS:
        raise bad_request(f"{what}: {len(values)} items is over the limit of {MAX_ITEMS} per request")
    items = []
    for i, value in enumerate(values):
        try:
            items.append(make(i, value))
        except InvalidConversationError as exc:
            raise bad_request(f"{what}[{i}]: {exc}", "invalid") from None
    return items


async def score_items(
    request: web.Request, items: Sequence[dict[str, np.ndarray]], what: str, indexed: bool = True
) -> tuple[list[Score], list[int]]:
    """Each item's Score and token count, in order; the first failing item (in input order) is the
    one answer, named `what[i]` (these formats have no per-item errors), after all have finished."""
    client = request.app[CLIENT]
    outcomes = await asyncio.gather(*(client.score_tensors(item) for item in items), return_exceptions=True)
    scores, tokens = [], []
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            raise item_error(outcome, f"{what}[{i}]" if indexed else what) from outcome
        scores.append(outcome[0][0])
        tokens.append(outcome[1][0])
    return scores, tokens


ENSEMBLE_PREFIX = f"in ensemble '{protocol.ENSEMBLE_MODEL}', "


def item_error(exc: BaseException, where: str) -> GatewayError:
    """The gateway's answer to a client error for one item."""
    message = str(exc).removeprefix(ENSEMBLE_PREFIX)
    if isinstance(exc, InvalidConversationError):
        return bad_request(f"{where}: {message}", "invalid")
    if isinstance(exc, ServerUnavailableError):
        return GatewayError(503, f"the reward model is not available: {message}", "unavailable")
    if isinstance(exc, RequestTimeoutError):
        return GatewayError(504, f"{where}: no answer in time", "timeout")
    if isinstance(exc, PermissionDeniedError):  # the front's own key for Triton's gRPC is wrong: the server's fault
        return GatewayError(500, "the gateway was refused by the reward model (its key)", "internal")
    if isinstance(exc, RewardClientError):
        return GatewayError(500, f"{where}: {message}", "internal")
    raise exc


def now() -> int:
    return int(time.time())


def checkpoint_normalization(checkpoint: str | Path) -> tuple[float, float] | None:
    """(mean, std) of an OpenRLHF reward checkpoint trained with normalize_reward (its config.json
    carries `normalize_reward`, `mean` and `std`), else None."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not config.get("normalize_reward") or not isinstance(config.get("std"), (int, float)) or not config["std"] > 0:
        return None
    return float(config.get("mean", 0.0)), float(config["std"])
