"""Exceptions raised by reward_client.

RewardClientError
├── InvalidConversationError   the conversation is malformed (checked locally or by the server)
├── ServerUnavailableError     no server answered: connection refused, reset, or not ready
├── RequestTimeoutError        the server did not answer within the timeout
└── ServerError                the server answered with any other error
"""

from __future__ import annotations


class RewardClientError(Exception):
    """Base of every error this package raises."""


class InvalidConversationError(RewardClientError, ValueError):
    """The conversation cannot be scored as given; the message says what is wrong and where.

    `reason` is one of REJECTION_REASONS (the label of the server's rejection counter)."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


# Why a conversation was rejected: its encoding, its structure, the order of its turns, its size,
# its chat template, or a per-turn request its template cannot serve.
REJECTION_REASONS = ("encoding", "malformed", "order", "too_large", "too_many_turns", "too_long", "template", "per_turn")


class ServerUnavailableError(RewardClientError, ConnectionError):
    """The server could not be reached or is not ready; scoring is idempotent, so retrying is safe."""


class RequestTimeoutError(RewardClientError, TimeoutError):
    """The server did not answer in time."""


class ServerError(RewardClientError):
    """The server answered with an error other than an invalid conversation."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status
