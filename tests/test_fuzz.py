"""Property-based bad (and good) inputs against the live server.

Every answer is either a score equal to the reference (for a valid conversation) or INVALID_ARG
carrying exactly the message the shared validator gives locally; a good conversation sent at the
same moment (so the dynamic batcher puts it next to the fuzzed one) always gets its exact score; the
server stays ready. A few hundred examples in `make test`, the same ones every run; `make fuzz` runs 10,000 new ones
(FUZZ_EXAMPLES).
"""

from __future__ import annotations

import json
import os
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reward_client.conversation import parse_json
from reward_client.errors import InvalidConversationError

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
# make test draws the same examples every run (a CI run is red only for a commit's own reasons); make fuzz, new ones
DERANDOMIZE = "FUZZ_EXAMPLES" not in os.environ
BATCHMATE = [{"role": "user", "content": "Is this scored exactly?"}, {"role": "assistant", "content": "Always."}]
ROLES = ["system", "user", "assistant", "bot", "User", "", "tool"]

text = st.text(st.characters(codec="utf-8"), max_size=200) | st.sampled_from(["<|eot_id|>", "{{ 1 }}", "\x00", "👍" * 50, " " * 30])
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": text})
valid = st.builds(
    lambda system, turns: (
        ([{"role": "system", "content": system}] if system is not None else [])
        + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    ),
    st.none() | text,
    st.lists(text, min_size=1, max_size=6).map(lambda turns: turns if len(turns) % 2 == 0 else [*turns, "ok"]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)


def mutate(draw_conversation: list, how: int, junk) -> object:
    conversation = [dict(m) for m in draw_conversation]
    target = conversation[how % len(conversation)]
    mutations = [
        lambda: target.update(role=str(junk)),
        lambda: target.update(content=junk),
        lambda: target.update(extra=junk),
        lambda: target.pop("content"),
        lambda: conversation.reverse(),
        lambda: conversation.clear(),
        lambda: conversation.append(dict(target)),
    ]
    mutations[how % len(mutations)]()
    return conversation


def with_content(conversation: list, raw: bytes) -> bytes:
    """`conversation` as JSON with its first message's content replaced by the raw JSON text `raw`."""
    marked = [{**conversation[0], "content": "@@RAW@@"}, *conversation[1:]]
    return json.dumps(marked).encode().replace(b'"@@RAW@@"', raw, 1)


# Inputs Python's own parser and codecs trip on (RecursionError, ValueError, TypeError) unless the
# validator catches them: deep nesting, lone surrogates (valid JSON escapes, not encodable UTF-8),
# integers over sys.get_int_max_str_digits() digits, speakers that are not strings.
deep = st.integers(1, 20_000).map(lambda n: b"[" * n + b"]" * n) | st.builds(
    lambda c, n: with_content(c, b"[" * n + b"]" * n), valid, st.integers(1, 5_000)
)
surrogate_text = st.builds(lambda a, s, b: a + s + b, text, st.characters(categories=["Cs"]), text)
surrogates = st.builds(lambda c, t: with_content(c, json.dumps(t).encode()), valid, surrogate_text)
long_numbers = st.builds(lambda c, d: with_content(c, b"9" * d), valid, st.integers(4_000, 6_000))
speakers = st.builds(
    lambda speaker, turns: json.dumps({"conversations": [{"from": speaker, "value": "q"}, *turns]}).encode(),
    json_values,
    st.just([{"from": "Assistant", "value": "a"}]),
)

payloads = st.one_of(
    deep,
    surrogates,
    long_numbers,
    speakers,
    valid.map(lambda c: json.dumps(c).encode()),
    st.builds(mutate, valid, st.integers(0, 100), json_values).map(lambda c: json.dumps(c).encode()),
    st.lists(message, max_size=5).map(lambda c: json.dumps(c).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda system, turns: {"system": system, "mask": "User", "conversations": turns}, json_values, json_values).map(
        lambda c: json.dumps(c).encode()
    ),
    st.binary(max_size=300),
)


@pytest.fixture(scope="module")
def raw_client(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def send(client, payloads: list[bytes]) -> list:
    """All payloads at once (one request each), so the dynamic batcher can put them together."""
    answers: queue.Queue = queue.Queue()
    for i, payload in enumerate(payloads):
        tensor = grpcclient.InferInput("CONVERSATION", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[payload]], dtype=np.object_))
        client.async_infer("reward_model", [tensor], callback=lambda result, error, i=i: answers.put((i, result, error)))
    results = [None] * len(payloads)
    for _ in payloads:
        i, result, error = answers.get(timeout=60)
        results[i] = error if error is not None else float(result.as_numpy("REWARD")[0, 0])
    return results


@pytest.fixture(scope="module")
def batchmate_score(reference_reward):
    return reference_reward(BATCHMATE)


@settings(
    max_examples=EXAMPLES,
    derandomize=DERANDOMIZE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(payload=payloads)
def test_fuzzed_inputs_get_a_score_or_a_named_error(raw_client, tokenizer, reference_reward, batchmate_score, payload):
    fuzzed, mate = send(raw_client, [payload, json.dumps(BATCHMATE).encode()])
    assert isinstance(mate, float) and abs(mate - batchmate_score) <= 1e-4, mate
    try:
        messages = parse_json(payload)
        tokens = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        expected_error = f"conversation: {tokens} tokens is over the limit of 4096 tokens" if tokens > 4096 else None
    except InvalidConversationError as exc:
        expected_error = str(exc)
    if expected_error is None:
        assert isinstance(fuzzed, float), fuzzed
        assert abs(fuzzed - reference_reward(messages)) <= 1e-4
    else:
        assert not isinstance(fuzzed, float), f"scored {fuzzed}, expected: {expected_error}"
        assert fuzzed.status() == "StatusCode.INVALID_ARGUMENT"
        assert expected_error in fuzzed.message(), (expected_error, fuzzed.message())
    assert raw_client.is_server_ready() and raw_client.is_model_ready("reward_model")
