"""The ensemble's inputs beside CONVERSATION: raw TEXT, pre-tokenized TOKENS, and left truncation.

Exactly one of CONVERSATION, TEXT and TOKENS per request:
- TEXT is text already in a chat template (what OpenRLHF and vLLM clients send), tokenized as
  given; with ADD_SPECIAL_TOKENS (default true) it starts with the tokenizer's BOS exactly once:
  a text that already begins with it (a template that writes `<|begin_of_text|>`) is not given a second;
- TOKENS are token ids, right-padded with -1 (rows of one request differ in length);
- KEEP_LAST_TOKENS N > 0 cuts from the left to at most N tokens: TEXT and TOKENS lose their earliest
  tokens (the BOS of a TEXT, added or written out, stays first), a conversation loses whole earliest exchanges (a system
  turn stays), never its scored turn (with SCORE_TURNS, one that would be cut is refused: it would lose turns).
  Without it, over `max_tokens` is refused as for conversations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from reward_client import protocol
from reward_server.errors import RequestError
from reward_server.templating import ChatTokenizer

SOURCES = (protocol.CONVERSATION, protocol.TEXT, protocol.TOKENS)


class Inputs:
    """Encodes each row of a request, whichever input it came in."""

    def __init__(self, chat: ChatTokenizer) -> None:
        self.chat = chat
        self.prefix = leading_special_tokens(chat.tokenizer)
        self.vocab_size = len(chat.tokenizer)

    def encode(self, tensors: Mapping[str, np.ndarray | None]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids, read positions) of each row of one request; `tensors`: its inputs by name (None:
        absent). RequestError names the row and what is wrong."""
        (encoded,) = self.encode_requests([tensors])
        if isinstance(encoded, Exception):
            raise encoded
        return encoded

    def encode_requests(self, requests: Sequence[Mapping[str, np.ndarray | None]]) -> list[list[tuple[np.ndarray, np.ndarray]] | Exception]:
        """`encode` of each request, or the error that failed it (its own: the others are encoded). The rows
        that are one text each (TEXT rows, and conversations read at their last token and not cut) of all
        the requests are tokenized in one call: one after another, a request of 64 conversations of 2,300
        tokens took 64 x 3.7 ms of one core, and so do 64 requests of one that queued while a batch was
        tokenized (RLHF's, one response a request); the fast tokenizer spreads a batch over the cores."""
        parsed: list[tuple[str, np.ndarray, dict[str, np.ndarray], dict[int, str]] | Exception] = []
        for tensors in requests:
            try:
                source, rows, flags = self._parse(tensors)
                parsed.append((source, rows, flags, self._texts(source, rows, flags)))
            except Exception as exc:
                parsed.append(exc)
        ids = iter(self.chat.tokenize([text for p in parsed if not isinstance(p, Exception) for text in p[3].values()]))
        encoded: list[list[tuple[np.ndarray, np.ndarray]] | Exception] = []
        for p in parsed:
            if isinstance(p, Exception):
                encoded.append(p)
                continue
            source, rows, flags, texts = p
            try:
                encoded.append(self._rows(source, rows, flags, {b: next(ids) for b in texts}))
            except Exception as exc:
                encoded.append(exc)
        return encoded

    def _parse(self, tensors: Mapping[str, np.ndarray | None]) -> tuple[str, np.ndarray, dict[str, np.ndarray]]:
        """The request's source input, its rows, and its per-row flags."""
        given = [name for name in SOURCES if tensors.get(name) is not None]
        if len(given) != 1:
            raise RequestError(f"send exactly one of {', '.join(SOURCES)}; got {', '.join(given) or 'none'}", "tensors")
        rows = tensors[given[0]]
        if not len(rows):
            raise RequestError(f"{given[0]}: a request needs at least one row", "tensors")
        rows = rows.reshape(len(rows), -1)
        flags = {name: _column(tensors.get(name), len(rows), default) for name, default in _FLAGS.items()}
        if given[0] != protocol.CONVERSATION and tensors.get(protocol.SCORE_TURNS) is not None and flags[protocol.SCORE_TURNS].any():
            raise RequestError(f"{protocol.SCORE_TURNS} needs {protocol.CONVERSATION} (turns are not known in text or tokens)", "per_turn")
        return given[0], rows, flags

    def _rows(
        self, source: str, rows: np.ndarray, flags: Mapping[str, np.ndarray], tokenized: Mapping[int, list[int]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each row's (token ids, read positions), `tokenized` holding the ids of the rows `_texts` gave."""
        encoded = []
        for b, row in enumerate(rows):
            keep_last = int(flags[protocol.KEEP_LAST_TOKENS][b])
            try:
                if keep_last < 0:
                    raise RequestError(f"{protocol.KEEP_LAST_TOKENS}: {keep_last} is negative", "malformed")
                if b in tokenized and source == protocol.CONVERSATION:
                    encoded.append(self.chat.read_last(tokenized[b]))
                elif source == protocol.CONVERSATION:
                    encoded.append(self.conversation(row[0], bool(flags[protocol.SCORE_TURNS][b]), keep_last))
                elif source == protocol.TEXT:
                    ids, prefix = tokenized[b], self.prefix if flags[protocol.ADD_SPECIAL_TOKENS][b] else []
                    if prefix and ids[: len(prefix)] == prefix:  # written out in the text: kept first, once, as an added one
                        ids = ids[len(prefix) :]
                    encoded.append(_last(self._fit(prefix, ids, keep_last, "text")))
                else:
                    encoded.append(_last(self.tokens(row, keep_last)))
            except RequestError as exc:
                raise RequestError(_row(b, len(rows)) + str(exc), exc.reason) from None
        return encoded

    def _texts(self, source: str, rows: np.ndarray, flags: Mapping[str, np.ndarray]) -> dict[int, str]:
        """The text of each row that is one text (see encode_requests), by row."""
        texts = {}
        for b, row in enumerate(rows):
            try:
                if source == protocol.TEXT:
                    texts[b] = self._decoded(row[0])
                elif source == protocol.CONVERSATION and not flags[protocol.SCORE_TURNS][b] and not flags[protocol.KEEP_LAST_TOKENS][b]:
                    texts[b] = self.chat.render(self.chat.messages(row[0]))
            except RequestError as exc:
                raise RequestError(_row(b, len(rows)) + str(exc), exc.reason) from None
        return texts

    def conversation(self, payload: bytes, all_turns: bool, keep_last: int) -> tuple[np.ndarray, np.ndarray]:
        if not keep_last:
            return self.chat.encode(payload, all_turns)
        limit = min(keep_last, self.chat.max_tokens)
        if all_turns:  # scored whole if it fits: a client may send a KEEP_LAST_TOKENS with every request
            ids, reads = self.chat.encode(payload, all_turns)
            if len(ids) > limit:
                raise RequestError(
                    f"conversation: {len(ids)} tokens is over {protocol.KEEP_LAST_TOKENS} {limit}, and with "
                    f"{protocol.SCORE_TURNS} it is not cut (a cut conversation loses turns)",
                    "per_turn",
                )
            return ids, reads
        messages = self.chat.messages(payload)
        ids = self.chat.rendered_ids(messages)
        if len(ids) <= limit:
            return self.chat.read_last(ids)
        # The fewest earliest user + assistant exchanges dropped that make it fit, found by bisection (a template's
        # render shrinks as exchanges go): a few renders, not one per exchange (a 256-turn conversation took 127).
        head = 1 if messages[0]["role"] == "system" else 0

        def without(dropped: int) -> list:
            return messages[:head] + messages[head + 2 * dropped :]

        too_few, enough = 0, (len(messages) - head) // 2 - 1  # dropped: too few to fit; enough (all but the last exchange)
        fitting = self.chat.rendered_ids(without(enough))
        if len(fitting) > limit:
            kept = "its system turn and last exchange are" if head else "its last exchange alone is"
            never_cut = "the system turn and the scored turn are" if head else "the scored turn is"
            raise RequestError(
                f"conversation: {kept} {len(fitting)} tokens, over the limit of {limit} tokens "
                f"(earlier exchanges are dropped; {never_cut} never cut)",
                "too_long",
            )
        while enough - too_few > 1:
            middle = (too_few + enough) // 2
            ids = self.chat.rendered_ids(without(middle))
            if len(ids) <= limit:
                enough, fitting = middle, ids
            else:
                too_few = middle
        return self.chat.read_last(fitting)

    def _decoded(self, payload: bytes) -> str:
        if len(payload) > self.chat.max_bytes:
            raise RequestError(f"text: {len(payload)} bytes is over the limit of {self.chat.max_bytes} bytes", "too_large")
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"text: not valid UTF-8 (byte {exc.start})", "encoding") from None

    def tokens(self, row: np.ndarray, keep_last: int) -> np.ndarray:
        padding = np.flatnonzero(row == -1)
        ids = row[: padding[0]] if len(padding) else row
        if np.any(row[len(ids) :] != -1):
            raise RequestError("tokens: -1 pads the end of a row only", "tensors")
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise RequestError(f"tokens: token ids must lie in [0, {self.vocab_size})", "tensors")
        return self._fit([], ids.tolist(), keep_last, "tokens")

    def _fit(self, prefix: list[int], ids: list[int], keep_last: int, what: str) -> np.ndarray:
        if not ids:
            raise RequestError(f"{what}: empty", "malformed")
        if keep_last:
            keep_last = min(keep_last, self.chat.max_tokens)
            if keep_last <= len(prefix):
                raise RequestError(f"{protocol.KEEP_LAST_TOKENS} {keep_last} leaves no room after the BOS", "malformed")
            ids = ids[-(keep_last - len(prefix)) :]
        row = [*prefix, *ids]
        if len(row) > self.chat.max_tokens:
            raise RequestError(f"{what}: {len(row)} tokens is over the limit of {self.chat.max_tokens} tokens", "too_long")
        return np.asarray(row, dtype=np.int32)


def leading_special_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's BOS; none for Qwen's), whatever it puts after
    it (a tokenizer saved with add_eos_token appends its EOS: the text is then not at the end)."""
    with_special = tokenizer.encode("a", add_special_tokens=True)
    without = tokenizer.encode("a", add_special_tokens=False)
    starts = [s for s in range(len(with_special) - len(without) + 1) if with_special[s : s + len(without)] == without]
    return with_special[: starts[0]] if starts else []


_FLAGS = {protocol.SCORE_TURNS: False, protocol.ADD_SPECIAL_TOKENS: True, protocol.KEEP_LAST_TOKENS: 0}


def _column(tensor: np.ndarray | None, rows: int, default: bool | int) -> np.ndarray:
    """One value per row of an optional [B, 1] input (its default where absent)."""
    if tensor is None:
        return np.full(rows, default)
    values = tensor.reshape(-1)
    if len(values) != rows:
        raise RequestError(f"optional inputs need one value per row ({rows}), got {len(values)}", "tensors")
    return values


def _row(index: int, rows: int) -> str:
    return f"row {index}: " if rows > 1 else ""


def _last(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Text and tokens are read at their last token only."""
    return ids, np.asarray([len(ids) - 1], dtype=np.int32)
