"""Conversation JSON -> the checkpoint's own chat template -> token ids, within a token limit."""

from __future__ import annotations

import jinja2
import numpy as np
from transformers import AutoTokenizer

from reward_client.conversation import parse_json
from reward_client.errors import InvalidConversationError


class ChatTokenizer:
    """Renders conversations with the checkpoint's chat template (transformers' sandboxed renderer)."""

    def __init__(self, checkpoint: str, max_tokens: int) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        if not self.tokenizer.chat_template:
            raise ValueError(f"checkpoint {checkpoint} has no chat template")
        self.max_tokens = max_tokens

    def encode(self, payload: bytes) -> np.ndarray:
        """Token ids of one wire-format conversation; InvalidConversationError names any problem."""
        messages = parse_json(payload)
        try:
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, return_dict=False)
        except jinja2.TemplateError as exc:  # the template's own raise_exception()
            raise InvalidConversationError(f"conversation: rejected by the chat template: {exc}") from None
        if len(ids) > self.max_tokens:
            raise InvalidConversationError(f"conversation: {len(ids)} tokens is over the limit of {self.max_tokens} tokens")
        return np.asarray(ids, dtype=np.int32)
