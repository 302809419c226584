"""Client SDK for the Triton reward-model server.

from reward_client import RewardClient
RewardClient("localhost:8001").score([{"role": "user", "content": "What is 1+1?"},
                                      {"role": "assistant", "content": "1+1=2"}])
"""

from reward_client.client import RewardClient, Timeout
from reward_client.conversation import Conversation, Message
from reward_client.errors import (
    InvalidConversationError,
    RequestTimeoutError,
    RewardClientError,
    ServerError,
    ServerUnavailableError,
)
from reward_client.scores import Score

__all__ = [
    "Conversation",
    "InvalidConversationError",
    "Message",
    "RequestTimeoutError",
    "RewardClient",
    "RewardClientError",
    "Score",
    "ServerError",
    "ServerUnavailableError",
    "Timeout",
]
