"""Conversation JSON -> the checkpoint's own chat template -> token ids, within size and token limits."""

from __future__ import annotations

import jinja2
import numpy as np
from transformers import AutoTokenizer

from reward_client.conversation import parse_json
from reward_client.errors import InvalidConversationError


class ChatTokenizer:
    """Renders conversations with the checkpoint's chat template (transformers' sandboxed renderer)."""

    def __init__(self, checkpoint: str, max_tokens: int, max_bytes: int = 1 << 20, max_turns: int = 256) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        if not self.tokenizer.chat_template:
            raise ValueError(f"checkpoint {checkpoint} has no chat template")
        self.max_tokens, self.max_bytes, self.max_turns = max_tokens, max_bytes, max_turns

    def encode(self, payload: bytes, all_turns: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of one wire-format conversation, and the positions where scores are read: its
        last token, or the end of every assistant turn. InvalidConversationError names any problem."""
        if len(payload) > self.max_bytes:  # checked before parsing: the cost of a request stays bounded
            raise InvalidConversationError(f"conversation: {len(payload)} bytes is over the limit of {self.max_bytes} bytes", "too_large")
        messages = parse_json(payload)
        if len(messages) > self.max_turns:
            raise InvalidConversationError(
                f"conversation: {len(messages)} turns is over the limit of {self.max_turns} turns", "too_many_turns"
            )
        ids = self._render(messages)
        if len(ids) > self.max_tokens:
            raise InvalidConversationError(f"conversation: {len(ids)} tokens is over the limit of {self.max_tokens} tokens", "too_long")
        positions = [len(ids) - 1]
        if all_turns:
            positions = [
                self._turn_end(messages[: k + 1], ids, k) for k, m in enumerate(messages[:-1]) if m["role"] == "assistant"
            ] + positions
        return np.asarray(ids, dtype=np.int32), np.asarray(positions, dtype=np.int32)

    def _render(self, messages: list) -> list[int]:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, return_dict=False)
        except jinja2.TemplateError as exc:  # the template's own raise_exception()
            raise InvalidConversationError(f"conversation: rejected by the chat template: {exc}", "template") from None

    def _turn_end(self, head: list, ids: list[int], index: int) -> int:
        """Last position of the conversation cut after assistant turn `index`: its score, read in
        the whole conversation's forward pass, equals scoring the cut conversation alone only if
        the template renders the cut as a prefix of the whole."""
        prefix = self._render(head)
        if ids[: len(prefix)] != prefix:
            raise InvalidConversationError(
                f"conversation[{index}]: per-turn scores need a chat template that renders each turn as a prefix of "
                "the whole conversation; this checkpoint's template does not (score the cut conversations separately)",
                "per_turn",
            )
        return len(prefix) - 1
