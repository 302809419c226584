"""Clients for the Triton `reward_model`: `AsyncRewardClient` (asyncio) and its blocking twin `RewardClient`.

    async with AsyncRewardClient("localhost:8001") as client:       # gRPC (also "grpc://host:port")
        score = await client.score([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    with RewardClient(["http://rm-0:8000", "http://rm-1:8000"]) as client:   # HTTP, round-robin + failover
        client.score_batch(conversations)

All I/O goes through `AsyncRewardClient._request`: one server per try, round-robin over the URLs,
retried on the next URL when a server cannot be reached or is not ready (scoring is idempotent).
`RewardClient` runs the same coroutines on a private event-loop thread, so both clients give the
same results by construction. Every lower-level error becomes one of `reward_client.errors` in
`convert_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import socket
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp
import numpy as np
import tritonclient.grpc.aio as grpcclient
import tritonclient.http.aio as httpclient
from tritonclient.utils import InferenceServerException

from reward_client import conversation as conv
from reward_client import protocol
from reward_client.config import DEFAULT_CONCURRENCY, TLS, Endpoint, Retry, Timeout
from reward_client.errors import (
    InvalidConversationError,
    PermissionDeniedError,
    RequestTimeoutError,
    RewardClientError,
    ServerError,
    ServerUnavailableError,
)
from reward_client.inputs import text_inputs, token_inputs
from reward_client.scores import Ranked, Score, preference

T = TypeVar("T")
DEFAULT_TIMEOUT, DEFAULT_RETRY = Timeout(), Retry()

# gRPC status codes and HTTP statuses that Triton uses, mapped onto this package's errors.
_INVALID = {"StatusCode.INVALID_ARGUMENT", "400"}
_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "503"}
_TIMEOUT = {"StatusCode.DEADLINE_EXCEEDED", "504"}
_FORBIDDEN = {"401", "403", "StatusCode.UNAUTHENTICATED", "StatusCode.PERMISSION_DENIED"}  # no key, a wrong key, a restricted API
# Triton forces two message matches, both anchored at the start of its message so that request text
# quoted in a validation error can never match:
# - conditions that pass (the supervisor restarts the server, a model finishes loading) come with
#   statuses that also mean a bad request (HTTP 400 for "not ready" and an unknown model) or a server
#   bug (INTERNAL for a dead python-backend stub): only the message tells them apart;
_RETRYABLE = re.compile(
    r"^(in ensemble '[^']*', )?(Stub process '[^']*' is not healthy|Request for unknown model|(Server|[Mm]odel '[^']*') is not ready)"
)
# - Triton 2.51's gRPC frontend answers a call to a restricted protocol (key header missing or wrong)
#   with UNAVAILABLE, the status of an outage: "This protocol is restricted, expecting header
#   'triton-grpc-protocol-<key>'" (HTTP says 403 "This API is restricted, ..."). Retrying would only
#   repeat the refusal.
_RESTRICTED = re.compile(r"^This (API|protocol) is restricted")


def convert_error(exc: BaseException) -> RewardClientError:
    """Translate a tritonclient, aiohttp or socket error into the package's exception tree."""
    if isinstance(exc, RewardClientError):
        return exc
    if isinstance(exc, InferenceServerException):
        status, message = str(exc.status()), exc.message() or str(exc)
        if status in _FORBIDDEN or _RESTRICTED.match(message):
            return PermissionDeniedError(message)
        # What is worth retrying: not ready, not loaded (yet), a crashed python-backend stub (the
        # supervisor restarts the server), a call cancelled by a server shutting down or lost with its connection.
        lost = status == "StatusCode.INTERNAL" and message == protocol.GRPC_LOST_CALL
        if status in _UNAVAILABLE or status == "StatusCode.CANCELLED" or lost or _RETRYABLE.match(message):
            return ServerUnavailableError(message)
        if status in _INVALID:
            return InvalidConversationError(message, "server")
        if status in _TIMEOUT:
            return RequestTimeoutError(message)
        return ServerError(message, status)
    if isinstance(exc, (asyncio.TimeoutError, socket.timeout, TimeoutError)):
        return RequestTimeoutError(f"no answer in time: {exc!r}")
    if isinstance(exc, (OSError, aiohttp.ClientError)):
        return ServerUnavailableError(f"cannot reach the server: {exc!r}")
    return ServerError(f"{type(exc).__name__}: {exc}")


class _Connection:
    """A tritonclient asyncio client and the number of calls in flight on it."""

    def __init__(self, client: Any) -> None:
        self.client, self.calls, self.retired, self.closed = client, 0, False, False

    async def close_when_idle(self) -> None:
        if self.retired and self.calls == 0 and not self.closed:
            self.closed = True
            await self.client.close()


class _Transport:
    """One server. New calls share the current connection, opened in the running loop on first use.
    `reset(connection)` retires that connection (new calls open another; the server may have
    restarted), and a retired connection is closed once its last call has finished, so a call never
    runs on a channel or session that another call closed."""

    def __init__(self, endpoint: Endpoint, timeout: Timeout, tls: TLS | None) -> None:
        self.endpoint, self.timeout, self.tls = endpoint, timeout, tls or TLS()
        self.module: Any = grpcclient if endpoint.protocol == "grpc" else httpclient
        self._current: _Connection | None = None
        self._opening: asyncio.Lock | None = None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[_Connection]:
        while self._current is None:
            self._opening = self._opening or asyncio.Lock()
            async with self._opening:  # one connection per server, however many requests start at once
                if self._current is None:
                    self._current = _Connection(await self._open())
        connection = self._current
        connection.calls += 1  # no await since the check above: `connection` cannot be retired in between
        try:
            yield connection
        finally:
            connection.calls -= 1
            await connection.close_when_idle()

    async def _open(self) -> Any:
        host, port = self.endpoint.host_port
        # An explicit connect deadline: neither tritonclient transport exposes one of its own.
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout.connect)
        except asyncio.TimeoutError:
            raise ServerUnavailableError(f"no connection to {self.endpoint} within {self.timeout.connect} s") from None
        writer.close()
        if self.endpoint.protocol == "grpc":
            credentials = self.tls.grpc_credentials() if self.endpoint.tls else {}
            return grpcclient.InferenceServerClient(self.endpoint.address, ssl=self.endpoint.tls, **credentials)
        ssl_context = self.tls.ssl_context() if self.endpoint.tls else None
        return httpclient.InferenceServerClient(
            self.endpoint.address, conn_timeout=self.timeout.request, ssl=self.endpoint.tls, ssl_context=ssl_context
        )

    async def infer(
        self, model: str, payloads: Sequence[bytes] | Mapping[str, np.ndarray], score_turns: bool, headers: dict[str, str]
    ) -> Any:
        inputs = _inputs(self.module, payloads, score_turns)
        async with self.connection() as connection:
            try:
                call = connection.client.infer(model, inputs, headers=_wire_headers(self.endpoint.protocol, headers))
                return await asyncio.wait_for(call, self.timeout.request)
            except asyncio.CancelledError:
                if not _being_cancelled():
                    await self.reset(connection)  # the server cancelled the call: it may be restarting
                raise
            except Exception as exc:
                if isinstance(convert_error(exc), ServerUnavailableError):
                    await self.reset(connection)
                raise

    async def is_ready(self, model: str, headers: dict[str, str]) -> bool:
        async with self.connection() as connection:
            client, headers = connection.client, _wire_headers(self.endpoint.protocol, headers)
            try:
                ready = client.is_server_ready(headers=headers)
                if not await asyncio.wait_for(ready, self.timeout.request):
                    return False
                return bool(await asyncio.wait_for(client.is_model_ready(model, headers=headers), self.timeout.request))
            except Exception:
                await self.reset(connection)
                raise

    async def reset(self, connection: _Connection | None = None) -> None:
        """Retire `connection` (by default the current one): new calls open a new connection, and
        this one closes when its last call finishes (now, if it has none)."""
        connection = connection or self._current
        if connection is None:
            return
        if self._current is connection:
            self._current = None
        connection.retired = True
        await connection.close_when_idle()


class AsyncRewardClient:
    """asyncio client. Safe to share between tasks of one event loop; at most `concurrency`
    requests are in flight at once, whatever method sent them."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        model: str = protocol.ENSEMBLE_MODEL,
        timeout: Timeout = DEFAULT_TIMEOUT,
        retry: Retry = DEFAULT_RETRY,
        headers: dict[str, str] | None = None,
        tls: TLS | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        """`url`: one server or several (round-robin, failover). `headers` go with every request
        (e.g. {"Authorization": "Bearer ..."}); `tls` configures https:// and grpcs:// URLs."""
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("url: give at least one server URL")
        if concurrency < 1:
            raise ValueError(f"concurrency: {concurrency} is below 1 (no request could be sent)")
        self.endpoints = [Endpoint.parse(u) for u in urls]
        self.model, self.timeout, self.retry, self.headers = model, timeout, retry, dict(headers or {})
        self._transports = [_Transport(e, timeout, tls) for e in self.endpoints]
        self._turn = itertools.count()
        self._slots = asyncio.Semaphore(concurrency)

    async def score(self, conversation: Any) -> Score:
        """The reward of the conversation's final assistant turn (a float, with `.attributes`)."""
        return _scores(await self._request([conv.to_json(conversation)]))[0]

    async def score_turns(self, conversation: Any) -> list[Score]:
        """The Score of every assistant turn, in order, all from one forward pass on the server.

        Turn k's score equals scoring the conversation cut after turn k. Needs a chat template that
        renders each cut as a prefix of the whole (Llama 3.1's does; SteerLM's, which ends the
        scored turn with <extra_id_2>, does not: the server answers InvalidConversationError).
        """
        messages = conv.normalize(conversation)
        turns = sum(message["role"] == "assistant" for message in messages)
        return _turn_scores(await self._request([conv.to_json(messages)], score_turns=True), [turns])[0]

    async def score_text(self, text: str, *, add_special_tokens: bool = True, keep_last_tokens: int = 0) -> Score:
        """The reward of text already in a chat template (special tokens written out), scored as
        given; `add_special_tokens`: start it with the tokenizer's BOS unless it does already;
        `keep_last_tokens` N > 0: cut it from the left to N tokens."""
        return (await self.score_tensors(text_inputs(text, add_special_tokens, keep_last_tokens)))[0][0]

    async def score_tokens(self, ids: Sequence[int], *, keep_last_tokens: int = 0) -> Score:
        """The reward of token ids scored as given (`keep_last_tokens` as in score_text)."""
        return (await self.score_tensors(token_inputs(ids, keep_last_tokens)))[0][0]

    async def score_tensors(self, tensors: Mapping[str, np.ndarray]) -> tuple[list[Score], list[int]]:
        """One request of named ensemble inputs (reward_client.protocol; [rows, ...] each): each row's
        Score and how many tokens it scored."""
        result = await self._request({name: _wire_array(name, value) for name, value in tensors.items()})
        return _scores(result), result.as_numpy(protocol.NUM_TOKENS).reshape(-1).tolist()

    async def score_batch(self, conversations: Iterable[Any]) -> list[Score]:
        """Scores in input order, one request per conversation, `concurrency` in flight.

        Every conversation is validated before anything is sent. If any request fails, the first
        error (in input order) is raised after all of them have finished.
        """
        payloads = [conv.to_json(c) for c in conversations]
        outcomes = await asyncio.gather(*(self._request([p]) for p in payloads), return_exceptions=True)
        return [_scores(_raise_if_error(outcome))[0] for outcome in outcomes]

    async def score_group(self, conversations: Sequence[Any]) -> list[Score]:
        """Scores of conversations sent together (64 per request): the server computes a prefix
        they share (one prompt, several responses; one conversation cut after each turn) once.
        One bad conversation fails its whole request."""
        payloads = [conv.to_json(c) for c in conversations]
        size = protocol.MAX_BATCH_SIZE
        outcomes = await asyncio.gather(
            *(self._request(payloads[i : i + size]) for i in range(0, len(payloads), size)), return_exceptions=True
        )
        return [score for outcome in outcomes for score in _scores(_raise_if_error(outcome))]

    async def score_responses(self, prompt: Any, responses: Sequence[str]) -> list[Score]:
        """Scores of several responses to one prompt (best-of-n), in order; the prompt is computed once.

        `prompt`: a user message string, or messages ending with a user turn."""
        return await self.score_group(_with_responses(prompt, responses))

    async def rank(self, prompt: Any, responses: Sequence[str]) -> list[Ranked]:
        """The responses best first (ties keep input order)."""
        return _ranked(responses, await self.score_responses(prompt, responses))

    async def best_of_n(self, prompt: Any, responses: Sequence[str]) -> Ranked:
        """The highest-scoring response."""
        return (await self.rank(prompt, responses))[0]

    async def compare(self, prompt: Any, a: str, b: str) -> float:
        """P(a ≻ b) = σ(r_a − r_b), the Bradley–Terry preference of response `a` over `b`."""
        score_a, score_b = await self.score_responses(prompt, [a, b])
        return preference(score_a, score_b)

    async def is_ready(self) -> bool:
        """Whether some server is up with the reward model ready to score."""
        for transport in self._transports:
            try:
                if await transport.is_ready(self.model, self.headers):
                    return True
            except Exception:
                continue
        return False

    async def close(self) -> None:
        for transport in self._transports:
            await transport.reset()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _request(self, payloads: Sequence[bytes] | Mapping[str, np.ndarray], score_turns: bool = False) -> Any:
        """One inference request, tried on the next server in turn, retried as `self.retry` says."""
        async with self._slots:
            start, servers = next(self._turn), len(self._transports)
            tries = self.retry.attempts * servers
            for attempt in range(tries):
                if attempt % servers == 0:  # a new round: every server has failed once more
                    await asyncio.sleep(self.retry.delay(attempt // servers))
                transport = self._transports[(start + attempt) % servers]
                try:
                    return await transport.infer(self.model, payloads, score_turns, self.headers)
                except asyncio.CancelledError as exc:
                    if _being_cancelled():
                        raise  # our caller cancelled us
                    # grpc.aio raises CancelledError for an RPC the server cancelled (it shut down mid-call).
                    if attempt + 1 == tries:
                        raise ServerUnavailableError(f"{transport.endpoint} cancelled the request (shutting down?)") from exc
                except Exception as exc:
                    error = convert_error(exc)
                    if not isinstance(error, ServerUnavailableError) or attempt + 1 == tries:
                        raise error from exc
        raise AssertionError("unreachable: the last attempt raises")


class RewardClient:
    """Blocking twin of AsyncRewardClient (same arguments, same methods, same results). Thread-safe:
    calls from several threads share one event-loop thread and the `concurrency` limit."""

    def __init__(self, url: str | Sequence[str], **options: Any) -> None:
        self._client = AsyncRewardClient(url, **options)  # first: bad arguments leave no thread behind
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="reward-client", daemon=True)
        self._thread.start()
        self.endpoints, self.model = self._client.endpoints, self._client.model

    def score(self, conversation: Any) -> Score:
        return self._run(self._client.score(conversation))

    def score_turns(self, conversation: Any) -> list[Score]:
        return self._run(self._client.score_turns(conversation))

    def score_text(self, text: str, **options: Any) -> Score:
        return self._run(self._client.score_text(text, **options))

    def score_tokens(self, ids: Sequence[int], **options: Any) -> Score:
        return self._run(self._client.score_tokens(ids, **options))

    def score_tensors(self, tensors: Mapping[str, np.ndarray]) -> tuple[list[Score], list[int]]:
        return self._run(self._client.score_tensors(tensors))

    def score_batch(self, conversations: Iterable[Any]) -> list[Score]:
        return self._run(self._client.score_batch(conversations))

    def score_group(self, conversations: Sequence[Any]) -> list[Score]:
        return self._run(self._client.score_group(conversations))

    def score_responses(self, prompt: Any, responses: Sequence[str]) -> list[Score]:
        return self._run(self._client.score_responses(prompt, responses))

    def rank(self, prompt: Any, responses: Sequence[str]) -> list[Ranked]:
        return self._run(self._client.rank(prompt, responses))

    def best_of_n(self, prompt: Any, responses: Sequence[str]) -> Ranked:
        return self._run(self._client.best_of_n(prompt, responses))

    def compare(self, prompt: Any, a: str, b: str) -> float:
        return self._run(self._client.compare(prompt, a, b))

    def is_ready(self) -> bool:
        return self._run(self._client.is_ready())

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if not self._loop.is_running():
            coroutine.close()
            raise RuntimeError("RewardClient is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


def _inputs(module: Any, payloads: Sequence[bytes] | Mapping[str, np.ndarray], score_turns: bool) -> list[Any]:
    """The request tensors: each conversation a row of CONVERSATION, and SCORE_TURNS if asked; or
    named inputs as given."""
    if isinstance(payloads, Mapping):
        return [_tensor(module, name, value) for name, value in payloads.items()]
    tensor = module.InferInput(protocol.CONVERSATION, [len(payloads), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[p] for p in payloads], dtype=np.object_))
    if not score_turns:
        return [tensor]
    turns = module.InferInput(protocol.SCORE_TURNS, [len(payloads), 1], "BOOL")
    turns.set_data_from_numpy(np.ones((len(payloads), 1), dtype=bool))
    return [tensor, turns]


def _wire_headers(protocol_name: str, headers: dict[str, str]) -> dict[str, str]:
    """gRPC metadata keys are lower case: `Authorization: Bearer KEY` goes as `authorization`."""
    return {key.lower(): value for key, value in headers.items()} if protocol_name == "grpc" else headers


_WIRE_TYPES = {np.dtype(np.object_): "BYTES", np.dtype(bool): "BOOL", np.dtype(np.int32): "INT32"}


def _wire_array(name: str, value: Any) -> np.ndarray:
    """`value` as the wire types take it: any integers as INT32 (numpy's default is int64), bytes as
    BYTES; InvalidConversationError for what the protocol has no type for (checked before sending)."""
    value = np.asarray(value)
    if value.dtype.kind in "iu":
        info = np.iinfo(np.int32)
        if value.size and (value.min() < info.min or value.max() > info.max):
            raise InvalidConversationError(f"{name}: values outside INT32's range")
        return value.astype(np.int32)
    if value.dtype.kind == "S":
        return value.astype(np.object_)
    if value.dtype not in _WIRE_TYPES:
        raise InvalidConversationError(f"{name}: dtype {value.dtype} has no wire type (send int32, bool, or bytes as object)")
    return value


def _tensor(module: Any, name: str, value: np.ndarray) -> Any:
    tensor = module.InferInput(name, list(value.shape), _WIRE_TYPES[value.dtype])
    tensor.set_data_from_numpy(value)
    return tensor


def _scores(result: Any) -> list[Score]:
    """The final assistant turn's Score of each row."""
    names = _names(result)
    rewards, attributes = result.as_numpy(protocol.REWARD).reshape(-1), result.as_numpy(protocol.ATTRIBUTES)
    return [_score(r, a, names) for r, a in zip(rewards, attributes, strict=True)]


def _turn_scores(result: Any, turns: Sequence[int]) -> list[list[Score]]:
    """Each row's Score per assistant turn, in order: its first `turns[row]` columns (the rest is NaN padding;
    a NaN score among them is the model's, kept in its turn's place)."""
    names = _names(result)
    rows = zip(result.as_numpy(protocol.TURN_REWARDS), result.as_numpy(protocol.TURN_ATTRIBUTES), turns, strict=True)
    return [[_score(r, a, names) for r, a in zip(rewards[:n], attributes[:n], strict=True)] for rewards, attributes, n in rows]


def _score(reward: float, attributes: np.ndarray, names: list[str]) -> Score:
    return Score(float(reward), dict(zip(names, map(float, attributes), strict=True)))


def _names(result: Any) -> list[str]:
    names = result.as_numpy(protocol.ATTRIBUTE_NAMES)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names[0]]


def _with_responses(prompt: Any, responses: Sequence[str]) -> list[list[Any]]:
    """The prompt (a user message string, or messages ending with a user turn) + each response."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [[*messages, {"role": "assistant", "content": r}] for r in responses]


def _ranked(responses: Sequence[str], scores: Sequence[Score]) -> list[Ranked]:
    order = sorted(range(len(responses)), key=lambda i: -float(scores[i]))
    return [Ranked(index=i, response=responses[i], score=scores[i]) for i in order]


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return cancelling is None or cancelling() > 0


def _raise_if_error(outcome: T | BaseException) -> T:
    if isinstance(outcome, BaseException):
        raise convert_error(outcome) from outcome
    return outcome
