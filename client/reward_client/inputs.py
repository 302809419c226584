"""Named input tensors of one `reward_model` request with one row (reward_client.protocol): a
conversation, text already in a chat template, or token ids, each optionally cut from the left.
For `AsyncRewardClient.score_tensors` (and the server's gateway, which builds its requests here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reward_client import conversation as conv
from reward_client import protocol

Tensors = dict[str, np.ndarray]


def conversation_inputs(conversation: Any, keep_last_tokens: int = 0) -> Tensors:
    """Validated here (InvalidConversationError names the problem), as every client method does."""
    return _keep_last({protocol.CONVERSATION: np.array([[conv.to_json(conversation)]], dtype=np.object_)}, keep_last_tokens)


def text_inputs(text: str, add_special_tokens: bool = True, keep_last_tokens: int = 0) -> Tensors:
    encoded = conv.valid_text(text, "text").encode()  # InvalidConversationError for what UTF-8 cannot encode, as in a conversation
    tensors = {protocol.TEXT: np.array([[encoded]], dtype=np.object_), protocol.ADD_SPECIAL_TOKENS: np.array([[add_special_tokens]])}
    return _keep_last(tensors, keep_last_tokens)


def token_inputs(ids: Sequence[int], keep_last_tokens: int = 0) -> Tensors:
    return _keep_last({protocol.TOKENS: np.array([list(ids)], dtype=np.int32).reshape(1, -1)}, keep_last_tokens)


def _keep_last(tensors: Tensors, keep_last_tokens: int) -> Tensors:
    if keep_last_tokens:
        tensors[protocol.KEEP_LAST_TOKENS] = np.array([[keep_last_tokens]], dtype=np.int32)
    return tensors
