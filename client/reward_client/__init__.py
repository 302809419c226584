"""Client SDK for the Triton reward-model server.

    from reward_client import RewardClient
    RewardClient("localhost:8001").score([{"role": "user", "content": "What is 1+1?"},
                                          {"role": "assistant", "content": "1+1=2"}])

Reference: docs/client.md.
"""

from reward_client.client import AsyncRewardClient, RewardClient
from reward_client.config import TLS, Retry, Timeout
from reward_client.conversation import Conversation, Message
from reward_client.errors import (
    InvalidConversationError,
    PermissionDeniedError,
    RequestTimeoutError,
    RewardClientError,
    ServerError,
    ServerUnavailableError,
)
from reward_client.scores import Ranked, Score, preference

__all__ = [
    "TLS",
    "AsyncRewardClient",
    "Conversation",
    "InvalidConversationError",
    "Message",
    "PermissionDeniedError",
    "Ranked",
    "RequestTimeoutError",
    "Retry",
    "RewardClient",
    "RewardClientError",
    "Score",
    "ServerError",
    "ServerUnavailableError",
    "Timeout",
    "preference",
]
