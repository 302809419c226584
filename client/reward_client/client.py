"""RewardClient: score conversations against the Triton `reward_model` over gRPC or HTTP.

    with RewardClient("localhost:8001") as client:          # gRPC (also "grpc://host:port")
        client.score([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    RewardClient("http://localhost:8000")                    # HTTP/REST (KServe v2)

All logic that does no I/O lives in `_BaseRewardClient`; the transport classes only call
tritonclient, and every error crosses into this package's exception tree in `convert_error`.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from reward_client import conversation as conv
from reward_client import protocol
from reward_client.errors import (
    InvalidConversationError,
    RequestTimeoutError,
    RewardClientError,
    ServerError,
    ServerUnavailableError,
)
from reward_client.scores import Score

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_REQUEST_TIMEOUT_S = 120.0
DEFAULT_CONCURRENCY = 16


@dataclass(frozen=True)
class Timeout:
    """Seconds to wait for a connection and for a whole request (over gRPC only `request` applies)."""

    connect: float = DEFAULT_CONNECT_TIMEOUT_S
    request: float = DEFAULT_REQUEST_TIMEOUT_S


@dataclass(frozen=True)
class Endpoint:
    protocol: str  # "grpc" or "http"
    address: str  # host:port
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """`http(s)://host:port` → HTTP; `grpc(s)://host:port` or bare `host:port` → gRPC."""
        parts = urlsplit(url if "://" in url else f"grpc://{url}")
        schemes = {"http": ("http", False), "https": ("http", True), "grpc": ("grpc", False), "grpcs": ("grpc", True)}
        if parts.scheme not in schemes:
            raise ValueError(f"url {url!r}: scheme must be http, https, grpc or grpcs")
        if not parts.hostname or parts.port is None:
            raise ValueError(f"url {url!r}: expected host:port")
        if parts.path not in ("", "/"):
            raise ValueError(f"url {url!r}: a path is not supported")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        name, tls = schemes[parts.scheme]
        return cls(name, f"{host}:{parts.port}", tls)


# gRPC status codes and HTTP statuses that Triton uses, mapped onto this package's errors.
_INVALID = {"StatusCode.INVALID_ARGUMENT", "400"}
_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "503"}
_TIMEOUT = {"StatusCode.DEADLINE_EXCEEDED", "504"}


def convert_error(exc: BaseException) -> RewardClientError:
    """Translate a tritonclient or socket error into the package's exception tree."""
    if isinstance(exc, RewardClientError):
        return exc
    if isinstance(exc, InferenceServerException):
        status, message = str(exc.status()), exc.message() or str(exc)
        if status in _INVALID:
            return InvalidConversationError(message)
        if status in _UNAVAILABLE:
            return ServerUnavailableError(message)
        if status in _TIMEOUT or "Deadline Exceeded" in message:
            return RequestTimeoutError(message)
        return ServerError(message, status)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return RequestTimeoutError(f"no answer in time: {exc}")
    if isinstance(exc, OSError):
        return ServerUnavailableError(f"cannot reach the server: {exc}")
    return ServerError(f"{type(exc).__name__}: {exc}")


class _BaseRewardClient:
    """Everything that does no I/O: URL, request tensors, result decoding."""

    def __init__(self, url: str, *, model: str, timeout: Timeout, headers: dict[str, str] | None) -> None:
        self.endpoint = Endpoint.parse(url)
        self.model = model
        self.timeout = timeout
        self.headers = dict(headers or {})

    def _inputs(self, conversations: Sequence[Any], module: Any, score_turns: bool = False) -> list[Any]:
        """One request carrying each conversation as a row."""
        payload = np.array([[conv.to_json(c)] for c in conversations], dtype=np.object_)
        tensor = module.InferInput(protocol.CONVERSATION, list(payload.shape), "BYTES")
        tensor.set_data_from_numpy(payload)
        if not score_turns:
            return [tensor]
        turns = module.InferInput(protocol.SCORE_TURNS, [len(conversations), 1], "BOOL")
        turns.set_data_from_numpy(np.ones((len(conversations), 1), dtype=bool))
        return [tensor, turns]

    @staticmethod
    def _scores(result: Any) -> list[Score]:
        """The final assistant turn's Score of each row."""
        names = _names(result)
        rewards, attributes = result.as_numpy(protocol.REWARD).reshape(-1), result.as_numpy(protocol.ATTRIBUTES)
        return [_score(r, a, names) for r, a in zip(rewards, attributes, strict=True)]

    @staticmethod
    def _turn_scores(result: Any) -> list[list[Score]]:
        """Each row's Score per assistant turn, in order (the padding is NaN)."""
        names = _names(result)
        rows = zip(result.as_numpy(protocol.TURN_REWARDS), result.as_numpy(protocol.TURN_ATTRIBUTES), strict=True)
        return [[_score(r, a, names) for r, a in zip(rewards, attributes, strict=True) if not np.isnan(r)] for rewards, attributes in rows]

    @staticmethod
    def _with_responses(prompt: Any, responses: Sequence[str]) -> list[list[Any]]:
        """The prompt (a user message string, or messages ending with a user turn) + each response.

        Validated later, with every other conversation, when `_inputs` encodes them."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return [[*messages, {"role": "assistant", "content": r}] for r in responses]


class RewardClient(_BaseRewardClient):
    """Blocking client. Thread-safe for `score`; `score_batch` overlaps requests itself."""

    def __init__(
        self,
        url: str,
        *,
        model: str = protocol.ENSEMBLE_MODEL,
        timeout: Timeout = Timeout(),
        headers: dict[str, str] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        super().__init__(url, model=model, timeout=timeout, headers=headers)
        self.concurrency = concurrency
        if self.endpoint.protocol == "grpc":
            self._module: Any = grpcclient
            self._client: Any = grpcclient.InferenceServerClient(self.endpoint.address, ssl=self.endpoint.tls)
        else:
            self._module = httpclient
            self._client = httpclient.InferenceServerClient(
                self.endpoint.address,
                ssl=self.endpoint.tls,
                concurrency=concurrency,
                connection_timeout=timeout.connect,
                network_timeout=timeout.request,
            )

    def score(self, conversation: Any) -> Score:
        """The reward of the conversation's final assistant turn (a float, with `.attributes`)."""
        inputs = self._inputs([conversation], self._module)
        try:
            return self._scores(self._infer(inputs))[0]
        except Exception as exc:
            raise convert_error(exc) from exc

    def score_turns(self, conversation: Any) -> list[Score]:
        """The Score of every assistant turn, in order, all from one forward pass on the server.

        Turn k's score equals scoring the conversation cut after turn k. Needs a chat template
        that renders each cut as a prefix of the whole (Llama 3.1's does; SteerLM's, which ends
        the scored turn with <extra_id_2>, does not: the server says so).
        """
        inputs = self._inputs([conversation], self._module, score_turns=True)
        try:
            return self._turn_scores(self._infer(inputs))[0]
        except Exception as exc:
            raise convert_error(exc) from exc

    def score_responses(self, prompt: Any, responses: Sequence[str]) -> list[Score]:
        """Rewards of several responses to one prompt (best-of-n), in order.

        They travel together (up to 64 per request), so the server computes the shared prompt
        once and reuses its keys/values for every response.
        """
        conversations = self._with_responses(prompt, responses)
        chunks = [conversations[i : i + protocol.MAX_BATCH_SIZE] for i in range(0, len(conversations), protocol.MAX_BATCH_SIZE)]
        outcomes = self._infer_many([self._inputs(chunk, self._module) for chunk in chunks])
        return [score for outcome in outcomes for score in self._scores(_raise_if_error(outcome))]

    def score_batch(self, conversations: Iterable[Any]) -> list[Score]:
        """Rewards in input order; requests overlap up to `concurrency` so the server can batch them.

        Every conversation is validated before anything is sent. If any request fails, the first
        error (in input order) is raised after all of them have finished.
        """
        outcomes = self._infer_many([self._inputs([c], self._module) for c in conversations])
        return [self._scores(_raise_if_error(outcome))[0] for outcome in outcomes]

    def is_ready(self) -> bool:
        """Whether the server and the reward model are ready to score."""
        try:
            return bool(
                self._client.is_server_ready(headers=self.headers) and self._client.is_model_ready(self.model, headers=self.headers)
            )
        except Exception:
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _infer(self, inputs: list[Any]) -> Any:
        if self.endpoint.protocol == "grpc":
            return self._client.infer(self.model, inputs, headers=self.headers, client_timeout=self.timeout.request)
        return self._client.infer(self.model, inputs, headers=self.headers)

    def _infer_many(self, batch: Sequence[list[Any]]) -> list[Any]:
        if self.endpoint.protocol == "http":
            # The HTTP client's connection pool (size `concurrency`) bounds what is in flight.
            handles = [self._client.async_infer(self.model, inputs, headers=self.headers) for inputs in batch]
            return [_outcome(handle.get_result) for handle in handles]
        outcomes: list[Any] = [None] * len(batch)
        slots = threading.Semaphore(self.concurrency)
        done = threading.Semaphore(0)

        def callback(index: int, result: Any, error: Any) -> None:
            outcomes[index] = error if error is not None else result
            slots.release()
            done.release()

        for index, inputs in enumerate(batch):
            slots.acquire()
            self._client.async_infer(
                self.model,
                inputs,
                callback=lambda result, error, index=index: callback(index, result, error),
                headers=self.headers,
                client_timeout=self.timeout.request,
            )
        for _ in batch:
            done.acquire()
        return outcomes


def _score(reward: float, attributes: np.ndarray, names: list[str]) -> Score:
    return Score(float(reward), dict(zip(names, map(float, attributes), strict=True)))


def _names(result: Any) -> list[str]:
    names = result.as_numpy(protocol.ATTRIBUTE_NAMES)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names[0]]


def _raise_if_error(outcome: Any) -> Any:
    if isinstance(outcome, BaseException):
        raise convert_error(outcome) from outcome
    return outcome


def _outcome(call: Any) -> Any:
    try:
        return call()
    except Exception as exc:  # collected; raised in input order by the caller
        return exc
