"""Conversation JSON -> the checkpoint's own chat template -> token ids, within size and token limits."""

from __future__ import annotations

import bisect

import jinja2
import numpy as np
from transformers import AutoTokenizer

from reward_client.conversation import parse_json
from reward_client.errors import InvalidConversationError
from reward_server.errors import RequestError
from reward_server.turn_cuts import Cuts, render_cuts

# What a checkpoint (or engine) folder needs beside its weights for its chat template and tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


class ChatTokenizer:
    """Renders conversations with the checkpoint's chat template (transformers' sandboxed renderer)."""

    def __init__(self, checkpoint: str, max_tokens: int, max_bytes: int = 1 << 20, max_turns: int = 256) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        if not self.tokenizer.chat_template:
            raise ValueError(f"checkpoint {checkpoint} has no chat template")
        self.max_tokens, self.max_bytes, self.max_turns = max_tokens, max_bytes, max_turns
        # Added tokens the tokenizer splits the text on before normalizing (turn ends): see _turn_end.
        # A slow tokenizer has no offsets: every cut is then tokenized.
        self.split_ids = (
            {i for i, t in self.tokenizer.added_tokens_decoder.items() if not t.normalized} if self.tokenizer.is_fast else set()
        )

    def encode(self, payload: bytes, all_turns: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of one wire-format conversation, and the positions where scores are read: its
        last token, or the end of every assistant turn. RequestError names any problem."""
        messages = self.messages(payload)
        if not all_turns:
            return self.read_last(self.rendered_ids(messages))
        cuts = self._cuts(messages)
        encoding = self.tokenizer(cuts.text, add_special_tokens=False, return_offsets_mapping=bool(self.split_ids))
        ids = encoding.input_ids  # what apply_chat_template(tokenize=True) gives: it encodes its text so
        self._check_length(ids)
        ends = [end for _, end in encoding.offset_mapping] if self.split_ids else []
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        positions = [self._turn_end(cuts.cut(k) or self.render(messages[: k + 1]), cuts.text, ids, ends, k) for k in turns[:-1]]
        positions.append(len(ids) - 1)
        for k, before, end in zip(turns[1:], positions, positions[1:], strict=False):
            if end <= before:  # the template rendered nothing of this turn and those between: no score of its own
                raise RequestError(
                    f"conversation[{k}]: ends where the assistant turn before it ends (the chat template renders "
                    "nothing of it); per-turn scores need every assistant turn to end at a token of its own",
                    "per_turn",
                )
        return np.asarray(ids, dtype=np.int32), np.asarray(positions, dtype=np.int32)

    def messages(self, payload: bytes) -> list:
        """The messages of one wire-format conversation, within the size and turn limits."""
        if len(payload) > self.max_bytes:  # checked before parsing: the cost of a request stays bounded
            raise RequestError(f"conversation: {len(payload)} bytes is over the limit of {self.max_bytes} bytes", "too_large")
        try:
            messages = parse_json(payload)
        except InvalidConversationError as exc:  # the shared schema's own error, as the server's
            raise RequestError(str(exc), exc.reason) from None
        if len(messages) > self.max_turns:
            raise RequestError(f"conversation: {len(messages)} turns is over the limit of {self.max_turns} turns", "too_many_turns")
        return messages

    def render(self, messages: list) -> str:
        """The conversation in the checkpoint's chat template."""
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, return_dict=False)
        except jinja2.TemplateError as exc:  # the template's own raise_exception()
            raise RequestError(f"conversation: rejected by the chat template: {exc}", "template") from None

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of rendered texts, as apply_chat_template(tokenize=True) gives them (it encodes its text
        without special tokens), in one call: a fast tokenizer spreads a batch over the CPU's cores."""
        return self.tokenizer(texts, add_special_tokens=False).input_ids if texts else []

    def rendered_ids(self, messages: list) -> list[int]:
        """Token ids of messages in the chat template, whatever their length."""
        return self.tokenize([self.render(messages)])[0]

    def read_last(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """A conversation's ids, within `max_tokens`, and its one read position: its last token."""
        self._check_length(ids)
        return np.asarray(ids, dtype=np.int32), np.asarray([len(ids) - 1], dtype=np.int32)

    def _check_length(self, ids: list[int]) -> None:
        if len(ids) > self.max_tokens:
            raise RequestError(f"conversation: {len(ids)} tokens is over the limit of {self.max_tokens} tokens", "too_long")

    def _cuts(self, messages: list) -> Cuts:
        """The whole conversation's text and, from that one render, the text of each cut it tells."""
        try:
            return render_cuts(self.tokenizer, messages)
        except Exception:  # a template the recording view cannot serve (or that refuses): rendered plainly
            return Cuts(self.render(messages), {})

    def _turn_end(self, cut: str, text: str, ids: list[int], ends: list[int], index: int) -> int:
        """Last token of the conversation cut after assistant turn `index` (rendered as `cut`), in the
        whole conversation's tokens: its score, read in the whole conversation's forward pass, equals
        scoring the cut alone only if the cut renders as a prefix of the whole, text and tokens.

        The whole conversation is tokenized once. The cut is not tokenized when it ends right after an
        added token the tokenizer never normalizes (a turn-end token such as <|eot_id|>): the tokenizer
        splits text on those before anything else, so the cut's tokens are the whole's up to there.
        Otherwise the cut is tokenized and compared (any template stays exact, just slower)."""
        token = bisect.bisect_left(ends, len(cut))
        if text.startswith(cut) and token < len(ends) and ends[token] == len(cut) and ids[token] in self.split_ids:
            return token
        prefix = self.tokenizer(cut, add_special_tokens=False).input_ids if text.startswith(cut) else None
        if prefix is None or ids[: len(prefix)] != prefix:
            raise RequestError(
                f"conversation[{index}]: per-turn scores need a chat template that renders each turn as a prefix of "
                "the whole conversation; this checkpoint's template does not (score the cut conversations separately)",
                "per_turn",
            )
        return len(prefix) - 1
