"""Exceptions raised by reward_client.

RewardClientError
├── InvalidConversationError   the conversation is malformed (checked locally or by the server)
├── ServerUnavailableError     no server answered: connection refused, reset, or not ready
├── PermissionDeniedError      the server refused the call: no API key or a wrong one, or a restricted API without its key
├── RequestTimeoutError        the server did not answer within the timeout
└── ServerError                the server answered with any other error
"""

from __future__ import annotations


class RewardClientError(Exception):
    """Base of every error this package raises."""


class InvalidConversationError(RewardClientError, ValueError):
    """The conversation cannot be scored as given; the message says what is wrong and where.

    `reason` names the kind of problem found before sending: "encoding" (not UTF-8 JSON), "malformed"
    (its shape), "order" (the order of its turns); "server" when the server refused it (its limits on
    tokens, bytes and turns, its chat template): the message says which (the server counts the refusal
    under its own reason, docs/monitoring.md)."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class ServerUnavailableError(RewardClientError, ConnectionError):
    """The server could not be reached or is not ready; scoring is idempotent, so retrying is safe."""


class PermissionDeniedError(RewardClientError, PermissionError):
    """The server refused the call (a restricted API, the key header missing or wrong); retrying
    would be refused again, so it is never retried."""


class RequestTimeoutError(RewardClientError, TimeoutError):
    """The server did not answer in time."""


class ServerError(RewardClientError):
    """The server answered with an error other than an invalid conversation."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status
