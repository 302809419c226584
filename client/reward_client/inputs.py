"""Named input tensors of one `reward_model` request with one row (reward_client.protocol): a
conversation, text already in a chat template, or token ids, each optionally cut from the left.
For `AsyncRewardClient.score_tensors` (and the server's gateway, which builds its requests here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from reward_client import conversation as conv
from reward_client import protocol
from reward_client.errors import InvalidConversationError

Tensors = dict[str, np.ndarray]
INT32_MAX = int(np.iinfo(np.int32).max)


def conversation_inputs(conversation: Any, keep_last_tokens: int = 0) -> Tensors:
    """Validated here (InvalidConversationError names the problem), as every client method does."""
    return _keep_last({protocol.CONVERSATION: np.array([[conv.to_json(conversation)]], dtype=np.object_)}, keep_last_tokens)


def text_inputs(text: str, add_special_tokens: bool = True, keep_last_tokens: int = 0) -> Tensors:
    encoded = conv.valid_text(text, "text").encode()  # InvalidConversationError for what UTF-8 cannot encode, as in a conversation
    tensors = {protocol.TEXT: np.array([[encoded]], dtype=np.object_), protocol.ADD_SPECIAL_TOKENS: np.array([[add_special_tokens]])}
    return _keep_last(tensors, keep_last_tokens)


def token_inputs(ids: Sequence[int], keep_last_tokens: int = 0) -> Tensors:
    ids = list(ids)
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i <= INT32_MAX for i in ids):
        raise InvalidConversationError(f"tokens: token ids must be integers in [0, {INT32_MAX}]")  # numpy's cast would wrap them
    return _keep_last({protocol.TOKENS: np.array([ids], dtype=np.int32).reshape(1, -1)}, keep_last_tokens)


def _keep_last(tensors: Tensors, keep_last_tokens: int) -> Tensors:
    if not 0 <= keep_last_tokens <= INT32_MAX:
        raise InvalidConversationError(f"keep_last_tokens: {keep_last_tokens} is not between 0 and {INT32_MAX}")
    if keep_last_tokens:
        tensors[protocol.KEEP_LAST_TOKENS] = np.array([[keep_last_tokens]], dtype=np.int32)
    return tensors
