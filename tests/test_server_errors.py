"""Bad input gets an error naming the problem; batchmates are unaffected; the server stays ready."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from reward_client import InvalidConversationError, RewardClient, protocol
from reward_server import metrics
from reward_server.tensors import pad_rows
from tests.live_server import metric

GOOD = [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "1+1=2"}]

# raw wire payload -> words the error must contain
BAD_PAYLOADS = {
    "not json": (b"this is not json", "not valid JSON"),
    "invalid utf-8": (b'[{"role": "user", "content": "\xff\xfe"}]', "not valid UTF-8"),
    "wrong shape": (b'{"role": "user", "content": "hi"}', "'conversations' list"),
    "number": (b"42", "expected a list of messages"),
    "unknown role": (b'[{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]', "conversation[0].role: 'bot'"),
    "last turn not assistant": (b'[{"role": "user", "content": "hi"}]', "last turn must be the assistant's"),
    "empty": (b"[]", "empty"),
    "not alternating": (
        b'[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]',
        "conversation[1].role: expected 'assistant'",
    ),
    "content not a string": (b'[{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]', "conversation[0].content"),
    # Client mistakes Python itself trips on (RecursionError, TypeError, ValueError) unless caught: 400s too.
    "nested too deeply": (b"[" * 5000 + b"]" * 5000, "conversation: JSON nested more than 64 levels deep"),
    "lone surrogate": (b'[{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]', "lone surrogate U+D800"),
    "nemo speaker not a string": (
        b'{"conversations": [{"from": ["User"], "value": "q"}, {"from": "Assistant", "value": "a"}]}',
        "conversations[0].from: ['User'] is not",
    ),
    "5000-digit integer": (b'[{"role": "user", "content": ' + b"1" * 5000 + b'}, {"role": "assistant", "content": "a"}]', "4300 digits"),
    "over the token limit": (
        json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 5000}]).encode(),
        "over the limit of 4096 tokens",
    ),
}


def raw_infer(module, url: str, payload: bytes):
    client = module.InferenceServerClient(url)
    tensor = module.InferInput(protocol.CONVERSATION, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[payload]], dtype=np.object_))
    try:
        return client.infer(protocol.ENSEMBLE_MODEL, [tensor])
    finally:
        client.close()


@pytest.mark.parametrize("case", sorted(BAD_PAYLOADS))
@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_bad_payload_is_named(server, case, transport):
    payload, words = BAD_PAYLOADS[case]
    module, url = (grpcclient, server.grpc_url) if transport == "grpc" else (httpclient, f"localhost:{server.http_port}")
    with pytest.raises(InferenceServerException) as caught:
        raw_infer(module, url, payload)
    assert words in caught.value.message()
    assert caught.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")
    assert "Traceback" not in caught.value.message()


# case -> the reason it is counted under in reward_requests_rejected_total
REASONS = {
    "nested too deeply": "malformed",
    "lone surrogate": "encoding",
    "nemo speaker not a string": "malformed",
    "5000-digit integer": "encoding",
}


def rejected(server) -> dict[str, float]:
    """reward_requests_rejected_total by reason, summed over models."""
    counts: dict[str, float] = {}
    for sample in server.metrics():
        if sample.name == metrics.REJECTED:
            counts[sample.labels["reason"]] = counts.get(sample.labels["reason"], 0) + sample.value
    return counts


def test_client_mistakes_are_counted_and_logged_in_one_line(server):
    """The inputs that used to reach Python's own errors (500 and a traceback each): counted by reason, no traceback."""
    before, log_before = rejected(server), len(server.log.read_bytes())
    for case in REASONS:
        with pytest.raises(InferenceServerException) as caught:
            raw_infer(grpcclient, server.grpc_url, BAD_PAYLOADS[case][0])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value.message()
    after = rejected(server)
    for reason in set(REASONS.values()):
        assert after.get(reason, 0) - before.get(reason, 0) == list(REASONS.values()).count(reason), (reason, before, after)
    assert "Traceback" not in server.log.read_bytes()[log_before:].decode(errors="replace")


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_score_turns_without_a_conversation_is_named(server, transport):
    module, url = (grpcclient, server.grpc_url) if transport == "grpc" else (httpclient, f"localhost:{server.http_port}")
    client = module.InferenceServerClient(url)
    tensor = module.InferInput(protocol.SCORE_TURNS, [1, 1], "BOOL")
    tensor.set_data_from_numpy(np.array([[True]]))
    with pytest.raises(InferenceServerException, match=protocol.CONVERSATION) as caught:
        client.infer(protocol.ENSEMBLE_MODEL, [tensor])
    client.close()
    assert caught.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")


def test_client_maps_server_rejection_to_invalid_conversation(client):
    too_long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 5000}]
    with pytest.raises(InvalidConversationError, match="over the limit"):
        client.score(too_long)


def test_client_rejects_locally_before_sending(client):
    with pytest.raises(InvalidConversationError, match=r"conversation\[1\]\.content"):
        client.score([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}])


def test_bad_requests_do_not_fail_their_batchmates(server, reference_reward):
    """Good and bad requests interleaved under concurrency: every good one gets its right score."""
    expected = reference_reward(GOOD)
    bad = BAD_PAYLOADS["unknown role"][0]
    good = json.dumps(GOOD).encode()
    payloads = [bad if i % 3 == 0 else good for i in range(48)]

    def send(payload):
        try:
            return float(raw_infer(grpcclient, server.grpc_url, payload).as_numpy(protocol.REWARD)[0, 0])
        except InferenceServerException as exc:
            return exc

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(send, payloads))
    for payload, outcome in zip(payloads, outcomes, strict=True):
        if payload is bad:
            assert isinstance(outcome, InferenceServerException) and "'bot'" in outcome.message()
        else:
            assert outcome == pytest.approx(expected, abs=1e-4)
    with RewardClient(server.grpc_url) as client:
        assert client.is_ready()


def test_server_stays_ready_after_every_bad_payload(server):
    for payload, _ in BAD_PAYLOADS.values():
        with pytest.raises(InferenceServerException):
            raw_infer(grpcclient, server.grpc_url, payload)
    with RewardClient(server.http_url) as client:
        assert client.is_ready()
        assert isinstance(client.score(GOOD), float)


def test_size_and_turn_limits_are_named(client):
    """Bytes are checked before parsing; turns after. Both answered INVALID_ARG, naming the limit."""
    from reward_client import InvalidConversationError

    huge = [{"role": "user", "content": "x" * (1 << 20)}, {"role": "assistant", "content": "y"}]
    with pytest.raises(InvalidConversationError, match=r"bytes is over the limit of 1048576 bytes"):
        client.score(huge)
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(258)]
    with pytest.raises(InvalidConversationError, match=r"258 turns is over the limit of 256 turns"):
        client.score(many)
    assert client.is_ready()


@pytest.mark.parametrize(
    ("ids", "lengths", "message"),
    [
        ([[5, 6, 7]], [0], "NUM_TOKENS 0 is not between 1 and 3"),
        ([[5, 6, 7]], [-2], "NUM_TOKENS -2 is not between 1 and 3"),
        ([[5, 6, 10**7]], [3], r"token ids must lie in \[0, 128256\)"),
        ([[5] * 4100], [4100], "NUM_TOKENS 4100 is not between 1 and 4096"),
        ([[5, 6], [7, 8]], [2], "batch size does not match other inputs"),  # Triton's own check
    ],
)
def test_the_engine_checks_requests_sent_to_it_directly(server, reference_reward, ids, lengths, message):
    """reward_engine is callable without the ensemble: bad rows are refused by name, and a good
    request in flight at the same time still gets its exact score."""
    import threading

    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from reward_client import RewardClient

    good = [{"role": "user", "content": "Direct?"}, {"role": "assistant", "content": "Yes."}]
    scored = []
    worker = threading.Thread(target=lambda: scored.append(RewardClient(server.grpc_url).score(good)))
    worker.start()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensors = [
        grpcclient.InferInput("INPUT_IDS", [len(ids), len(ids[0])], "INT32"),
        grpcclient.InferInput("NUM_TOKENS", [len(lengths), 1], "INT32"),
    ]
    tensors[0].set_data_from_numpy(np.array(ids, dtype=np.int32))
    tensors[1].set_data_from_numpy(np.array([[n] for n in lengths], dtype=np.int32))
    with pytest.raises(InferenceServerException, match=message) as raised:
        client.infer("reward_engine", tensors)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    worker.join()
    assert scored[0] == pytest.approx(reference_reward(good), abs=1e-4)
    assert client.is_model_ready("reward_engine")
    client.close()


def engine_inputs(rows: list[np.ndarray]) -> list:
    """reward_engine's INPUT_IDS and NUM_TOKENS for `rows` of token ids (zero-padded to the longest)."""
    ids = pad_rows(rows, 0).astype(np.int32)
    tensors = [grpcclient.InferInput(protocol.INPUT_IDS, list(ids.shape), "INT32")]
    tensors.append(grpcclient.InferInput(protocol.NUM_TOKENS, [len(rows), 1], "INT32"))
    tensors[0].set_data_from_numpy(ids)
    tensors[1].set_data_from_numpy(np.array([[len(r)] for r in rows], dtype=np.int32))
    return tensors


def engine_counts(server) -> tuple[float, float]:
    """reward_engine's requests waiting in Triton's queue now, and its packed steps so far."""
    samples = server.metrics()
    pending = metric(samples, "nv_inference_pending_request_count", model="reward_engine")
    return pending, metric(samples, f"{metrics.STEP_TOKENS}_count") or 0.0


def behind_a_long_request(server, client, hold: list[np.ndarray], rows: dict[str, np.ndarray]) -> tuple[bool, dict, float]:
    """Send `hold` (one request), then each of `rows` as a request of its own while it runs: whether they all
    waited in Triton's queue while it ran (then they are one batch), each one's REWARD or error, and the
    engine's steps meanwhile."""
    import queue
    import time

    done: queue.Queue = queue.Queue()

    def send(name: str, request_rows: list[np.ndarray]) -> None:
        client.async_infer("reward_engine", engine_inputs(request_rows), callback=lambda result, error: done.put((name, result, error)))

    _, steps_before = engine_counts(server)
    send("hold", hold)
    time.sleep(0.5)  # it reaches the engine, which takes it at once
    for name, row in rows.items():
        send(name, [row])
    deadline = time.monotonic() + 60
    while engine_counts(server)[0] < len(rows) and done.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    formed = engine_counts(server)[0] == len(rows) and done.empty()  # all queued, the long one still running
    got = {}
    for _ in range(len(rows) + 1):
        name, result, error = done.get(timeout=120)
        got[name] = error if error is not None else result.as_numpy(protocol.REWARD)[0, 0]
    return formed, got, engine_counts(server)[1] - steps_before


def test_a_batch_answered_over_two_steps_gives_every_request_its_own_answer(server):
    """Requests queued behind a long one are one batch: one refused (sent at once), three short ones and a
    1,400-token one answered by its first step of 2,048 tokens (sent at once), a 1,500-token one by its last
    (returned with execute, beside the others' None). Each gets its own answer: the bits it gets alone, or its
    error."""
    rng = np.random.default_rng(11)
    hold = [rng.integers(0, 128_000, 4000) for _ in range(16)]  # 16 steps of one row each: seconds on this CPU
    batch = {"short0": 30, "short1": 31, "short2": 32, "first": 1400, "last": 1500}
    rows = {"refused": np.array([5, 6, 10**7])} | {name: rng.integers(0, 128_000, n) for name, n in batch.items()}  # refused first
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for _ in range(3):  # until the batch formed behind the long request (the first time, unless the machine stalls)
            formed, got, steps = behind_a_long_request(server, client, hold, rows)
            if formed:
                break
        assert formed, "the batch never formed behind the long request"
        assert steps == 16 + 2  # the long request's rows, then the batch in two steps
        assert isinstance(got["refused"], InferenceServerException) and "token ids must lie in" in got["refused"].message()
        for name in batch:
            alone = client.infer("reward_engine", engine_inputs([rows[name]])).as_numpy(protocol.REWARD)[0, 0]
            assert got[name] == alone, name  # bit for bit
    finally:
        client.close()
