"""Errors the server raises for requests, typed so that no model recognises another's by its message.

RequestError    a request the server refuses (Triton INVALID_ARG), with the reason it is counted under
EngineError     a scoring call that failed inside the engine (Triton INTERNAL)
"""

from __future__ import annotations

# Why a request was rejected: its encoding, its structure, the order of its turns, its size, its
# chat template, a per-turn request its template cannot serve, or tensors sent straight to a model
# that do not fit its protocol. The label values of `reward_requests_rejected_total{reason}`.
REJECTION_REASONS = ("encoding", "malformed", "order", "too_large", "too_many_turns", "too_long", "template", "per_turn", "tensors")


class RequestError(ValueError):
    """The request cannot be served as sent; the message says what is wrong and where."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(message)
        self.reason = reason


class EngineError(RuntimeError):
    """Scoring failed inside the engine (not the request's fault); `invalid` when the engine refused
    the request itself (INVALID_ARG), which a caller passes on as the request's error."""

    def __init__(self, message: str, invalid: bool = False) -> None:
        super().__init__(message)
        self.invalid = invalid

    @classmethod
    def caused_by(cls, cause: Exception) -> EngineError:
        """What a request whose scoring failed is told (the short message), with the cause for the log."""
        error = cls(f"reward engine failed: {type(cause).__name__}")
        error.__cause__ = cause
        return error
