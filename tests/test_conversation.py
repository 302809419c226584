"""Conversation validation (no server)."""

from __future__ import annotations

import json

import pytest

from reward_client import InvalidConversationError
from reward_client.conversation import normalize, parse_json, to_json
from tests.corpus import nemo_record


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
        ({"conversations": [{"from": ["User"], "value": "q"}]}, "conversations[0].from: ['User'] is not 'User' or 'Assistant'"),
        ({"conversations": [{"from": {"a": 1}, "value": "q"}]}, "conversations[0].from: {'a': 1}"),
        ([{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "a"}], "conversation[0].content: not valid Unicode"),
        ({"conversations": [], "system": "x\udfff"}, "system: not valid Unicode (a lone surrogate U+DFFF at character 1)"),
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
    ("payload", "words", "reason"),
    [
        (b"\xff", "not valid UTF-8", "encoding"),
        (b"{", "not valid JSON", "encoding"),
        (json.dumps(1).encode(), "got int", "malformed"),
        (b"[" * 5000 + b"]" * 5000, "JSON nested more than 64 levels deep", "malformed"),
        (b"[" * 100_000, "JSON nested more than 64 levels deep", "malformed"),
        (b'[{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]', r"lone surrogate U\+D800", "encoding"),
        (b'[{"role": "user", "content": ' + b"7" * 5000 + b"}]", "a JSON number with more than 4300 digits", "encoding"),
        (b'{"conversations": [{"from": ["User"], "value": "q"}]}', r"conversations\[0\]\.from: \['User'\]", "malformed"),
    ],
)
def test_bad_wire_payloads(payload, words, reason):
    """Each is the client's mistake: an InvalidConversationError naming it (a 400 on the server), never
    the RecursionError, TypeError or ValueError Python would raise."""
    with pytest.raises(InvalidConversationError, match=words) as caught:
        parse_json(payload)
    assert caught.value.reason == reason


def test_the_cli_names_a_deeply_nested_file_without_a_traceback(tmp_path, capsys):
    from reward_client.cli import main

    path = tmp_path / "deep.json"
    path.write_text("[" * 5000 + "]" * 5000)
    assert main(["score", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("reward-client: maximum recursion depth exceeded") and "Traceback" not in error
