"""Conversation validation (no server)."""

from __future__ import annotations

import json

import pytest

from reward_client import InvalidConversationError
from reward_client.conversation import normalize, parse_json, to_json

from corpus import nemo_record


def test_openai_messages_pass_through():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert normalize(messages) == messages


def test_nemo_record_becomes_messages():
    assert normalize(nemo_record()) == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]


def test_nemo_record_without_system_has_no_system_turn():
    record = {"conversations": [{"from": "User", "value": "q"}, {"from": "Assistant", "value": "a"}]}
    assert [m["role"] for m in normalize(record)] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("conversation", "words"),
    [
        ([], "empty"),
        ("hello", "expected a list of messages"),
        ([{"role": "user", "content": "q"}], "last turn must be the assistant's"),
        ([{"role": "assistant", "content": "a"}], "conversation[0].role: expected 'user'"),
        ([{"role": "system", "content": "s"}], "last turn must be the assistant's"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "a"}], "conversation[1].role: expected 'assistant'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "name": "x"}], "unknown key(s) ['name']"),
        ([{"role": "user", "content": "q"}, ["assistant", "a"]], "conversation[1]: expected an object"),
        ([{"role": "user"}, {"role": "assistant", "content": "a"}], "conversation[0].content: expected a string"),
        ({"messages": []}, "'conversations' list"),
        ({"conversations": "x"}, "conversations: expected a list"),
        ({"conversations": [{"from": "Human", "value": "q"}]}, "conversations[0].from: 'Human'"),
        ({"conversations": [{"from": "User", "value": 3}]}, "conversations[0].value: expected a string"),
        ({"conversations": [], "mask": "Assistant"}, "mask: only 'User'"),
        ({"conversations": [], "system": 1}, "system: expected a string"),
    ],
)
def test_bad_conversations_are_named(conversation, words):
    with pytest.raises(InvalidConversationError) as caught:
        normalize(conversation)
    assert words in str(caught.value)


def test_wire_round_trip_keeps_unicode():
    messages = [{"role": "user", "content": "héllo 😀"}, {"role": "assistant", "content": "データ"}]
    payload = to_json(messages)
    assert "😀".encode() in payload
    assert parse_json(payload) == messages


@pytest.mark.parametrize(
    ("payload", "words"), [(b"\xff", "not valid UTF-8"), (b"{", "not valid JSON"), (json.dumps(1).encode(), "got int")]
)
def test_bad_wire_payloads(payload, words):
    with pytest.raises(InvalidConversationError, match=words):
        parse_json(payload)
