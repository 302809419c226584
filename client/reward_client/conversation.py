"""Conversations: the two accepted shapes, validated and normalised to chat messages.

Accepted:
- OpenAI style: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``;
- the NeMo-Aligner record: ``{"conversations": [{"from": "User"|"Assistant", "value": str,
  "label": ...}], "system": str, "mask": "User"}`` (other top-level keys, such as ids, are ignored).

Rules: an optional system turn first, then user and assistant turns alternating, starting with
the user and ending with the assistant (the turn that is scored). The server runs the same
checks; the client runs them first so that a bad conversation fails before it is sent.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

from reward_client.errors import InvalidConversationError


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


Conversation = Sequence[Mapping[str, Any]] | Mapping[str, Any]

MESSAGE_KEYS = {"role", "content"}
NEMO_TURN_KEYS = {"from", "value", "label", "canonical_form"}
NEMO_ROLES = {"User": "user", "Assistant": "assistant"}
MAX_DEPTH = 64  # of JSON lists and objects; a conversation needs 4


def normalize(conversation: Any) -> list[Message]:
    """Validate either accepted shape and return OpenAI-style messages.

    Raises InvalidConversationError naming the first problem and where it is.
    """
    if isinstance(conversation, Mapping):
        if "conversations" not in conversation:
            raise InvalidConversationError(
                "conversation: an object must be a NeMo-Aligner record with a 'conversations' list; "
                "otherwise send a list of {'role', 'content'} messages"
            )
        messages = _from_nemo(conversation)
    elif isinstance(conversation, Sequence) and not isinstance(conversation, (str, bytes)):
        messages = [_message(item, f"conversation[{i}]") for i, item in enumerate(conversation)]
    else:
        raise InvalidConversationError(
            f"conversation: expected a list of messages or a NeMo-Aligner record, got {type(conversation).__name__}"
        )
    _check_order(messages)
    return messages


def parse_json(payload: bytes) -> list[Message]:
    """Decode one UTF-8 JSON conversation as sent over the wire, then normalize it."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidConversationError(f"conversation: not valid UTF-8 (byte {exc.start})", "encoding") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidConversationError(
            f"conversation: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", "encoding"
        ) from None
    except RecursionError:  # Python's parser gives up near its recursion limit, which differs between processes
        value = _TOO_DEEP
    except ValueError:  # the only other one: an integer over sys.get_int_max_str_digits() digits
        raise InvalidConversationError(
            f"conversation: a JSON number with more than {sys.get_int_max_str_digits()} digits", "encoding"
        ) from None
    nestable = text.count("[") + text.count("{") > MAX_DEPTH  # else it cannot be that deep: skip the walk
    if value is _TOO_DEEP or (nestable and _deeper_than(value, MAX_DEPTH)):  # one answer at any depth, whatever the recursion limit
        raise InvalidConversationError(f"conversation: JSON nested more than {MAX_DEPTH} levels deep", "malformed")
    return normalize(value)


_TOO_DEEP = object()


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether lists/objects in `value` nest more than `limit` levels (iterative: no recursion to run out of)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def to_json(conversation: Any) -> bytes:
    """Validate a conversation and encode it as the server expects it."""
    return json.dumps(normalize(conversation), ensure_ascii=False).encode("utf-8")


def _object(item: Any, where: str, allowed: set[str], required: str) -> Mapping[str, Any]:
    """`item` as a mapping with no keys outside `allowed`."""
    if not isinstance(item, Mapping):
        raise InvalidConversationError(f"{where}: expected an object with {required}, got {type(item).__name__}")
    unknown = set(item) - allowed
    if unknown:
        raise InvalidConversationError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return item


def _string(item: Mapping[str, Any], key: str, where: str) -> str:
    return valid_text(item.get(key), f"{where}.{key}")


def valid_text(value: Any, where: str) -> str:
    """`value` if it is a string that UTF-8 can encode (JSON's \\ud800 escapes decode to lone surrogates, which it cannot)."""
    if not isinstance(value, str):
        raise InvalidConversationError(f"{where}: expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidConversationError(
            f"{where}: not valid Unicode (a lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start})", "encoding"
        ) from None
    return value


def _message(item: Any, where: str) -> Message:
    item = _object(item, where, MESSAGE_KEYS, "'role' and 'content'")
    role = item.get("role")
    if role not in ("system", "user", "assistant"):
        raise InvalidConversationError(f"{where}.role: {role!r} is not one of 'system', 'user', 'assistant'")
    return Message(role=role, content=_string(item, "content", where))


def _from_nemo(record: Mapping[str, Any]) -> list[Message]:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise InvalidConversationError(f"conversations: expected a list of turns, got {type(turns).__name__}")
    mask = record.get("mask", "User")
    if mask != "User":
        raise InvalidConversationError(f"mask: only 'User' is supported (the assistant turns are scored), got {mask!r}")
    messages: list[Message] = []
    system = valid_text(record.get("system", ""), "system")
    if system:
        messages.append(Message(role="system", content=system))
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        turn = _object(turn, where, NEMO_TURN_KEYS, "'from' and 'value'")
        speaker = turn.get("from")
        if not isinstance(speaker, str) or speaker not in NEMO_ROLES:  # a list is unhashable: no `in` on a dict
            raise InvalidConversationError(f"{where}.from: {speaker!r} is not 'User' or 'Assistant'")
        messages.append(Message(role=NEMO_ROLES[speaker], content=_string(turn, "value", where)))
    return messages


def _check_order(messages: list[Message]) -> None:
    if not messages:
        raise InvalidConversationError("conversation: empty; it needs at least a user turn and an assistant turn", "order")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    offset = len(messages) - len(turns)
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise InvalidConversationError(
                f"conversation[{i + offset}].role: expected {expected!r}, got {message['role']!r} "
                "(an optional system turn first, then user and assistant alternating)",
                "order",
            )
    if not turns or turns[-1]["role"] != "assistant":
        raise InvalidConversationError("conversation: the last turn must be the assistant's (it is the turn that is scored)", "order")
