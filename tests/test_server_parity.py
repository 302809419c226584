"""Scores through the live server equal the transformers reference (fp32)."""

from __future__ import annotations

import numpy as np
import pytest

from reward_client import RewardClient
from tests.corpus import conversations, nemo_record

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def corpus_and_reference(reference_reward, tokenizer):
    convs = conversations()
    lengths = [len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in convs]
    assert len(convs) >= 20
    assert 2500 <= max(lengths) <= 4096, lengths  # the corpus reaches ~3,000 tokens
    return convs, np.array([reference_reward(c) for c in convs])


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_score_batch_matches_reference(server, corpus_and_reference, transport):
    convs, expected = corpus_and_reference
    url = server.grpc_url if transport == "grpc" else server.http_url
    with RewardClient(url) as client:
        got = np.array(client.score_batch(convs))
    worst = np.abs(got - expected).max()
    print(f"max |server - reference| over {transport}: {worst:.3e} ({len(convs)} conversations)")
    assert worst <= TOLERANCE
    assert np.std(expected) > 1e-3  # the corpus really tells conversations apart


def test_score_one_by_one_matches_reference(client, corpus_and_reference):
    convs, expected = corpus_and_reference
    got = np.array([client.score(c) for c in convs[:6]])
    assert np.abs(got - expected[:6]).max() <= TOLERANCE


def test_nemo_record_scores_like_its_messages(client, reference_reward):
    record = nemo_record()
    messages = [{"role": "system", "content": record["system"]}]
    messages += [{"role": t["from"].lower(), "content": t["value"]} for t in record["conversations"]]
    assert client.score(record) == pytest.approx(reference_reward(messages), abs=TOLERANCE)


def test_score_responses_equals_scoring_each_conversation(client, reference_reward):
    """Best-of-n through the server (one request, shared prompt) equals the reference per conversation."""
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the sea. " * 40}]
    responses = ["Blue.", "Wet and wide.", "It is " + "very " * 30 + "big.", ""]
    got = client.score_responses(prompt, responses)
    expected = [reference_reward([*prompt, {"role": "assistant", "content": r}]) for r in responses]
    assert np.abs(np.array(got) - np.array(expected)).max() <= TOLERANCE
    assert client.score_responses("Describe the sea.", ["Blue."]) == pytest.approx(
        [reference_reward([{"role": "user", "content": "Describe the sea."}, {"role": "assistant", "content": "Blue."}])], abs=TOLERANCE
    )


def test_score_carries_the_head_outputs_by_name(client, corpus_and_reference):
    """-HF checkpoint: one output named "reward"; the Score is that float."""
    convs, expected = corpus_and_reference
    score = client.score(convs[0])
    assert score.attributes == {"reward": pytest.approx(float(score), abs=1e-7)}
    assert float(score) == pytest.approx(expected[0], abs=TOLERANCE)


def test_score_turns_equals_scoring_each_cut_conversation(client, reference_reward):
    """Every assistant turn in one forward pass == the reference on the conversation cut after that turn."""
    conversation = next(c for c in conversations() if sum(m["role"] == "assistant" for m in c) >= 3)
    cuts = [conversation[: i + 1] for i, m in enumerate(conversation) if m["role"] == "assistant"]
    got = client.score_turns(conversation)
    assert len(got) == len(cuts)
    assert np.abs(np.array(got) - np.array([reference_reward(c) for c in cuts])).max() <= TOLERANCE
    assert float(got[-1]) == pytest.approx(float(client.score(conversation)), abs=1e-5)
    assert got[0].attributes.keys() == {"reward"}


def test_one_conversation_scored_100_times_under_load_gives_one_value(server):
    """Interleaved with other conversations at concurrency 32, so it lands in many different dynamic
    batches (and twice in some): one value, bit for bit."""
    values = scored_100_times_under_load(server.grpc_url)
    assert len(values) == 100 and len(set(values)) == 1, sorted(set(values))


@pytest.fixture(scope="module")
def threaded(tmp_path_factory, checkpoint):
    """A server scoring on reward_engine's scoring thread (`scoring_thread`)."""
    from tests.live_server import start_server, stop_server

    env = {"REWARD_CHECKPOINT": str(checkpoint), "REWARD_SCORING_THREAD": "true"}
    started = start_server(tmp_path_factory.mktemp("threaded") / "server.log", env=env)
    yield started
    stop_server(started)


def test_the_scoring_thread_gives_the_reference_scores_and_one_value_under_load(threaded, corpus_and_reference):
    """Batches that arrive during a step join the next one there: other step compositions, the same bits."""
    convs, expected = corpus_and_reference
    with RewardClient(threaded.grpc_url) as client:
        got = np.array(client.score_batch(convs))
    assert np.abs(got - expected).max() <= TOLERANCE
    values = scored_100_times_under_load(threaded.grpc_url)
    assert len(values) == 100 and len(set(values)) == 1, sorted(set(values))
    with RewardClient(threaded.grpc_url) as client:
        assert float(client.score(convs[5])) == values[0]  # alone, after the load: the same value


def scored_100_times_under_load(url: str) -> list[float]:
    """One conversation scored 100 times interleaved with others at concurrency 32."""
    import asyncio

    from reward_client import AsyncRewardClient

    target, others = conversations()[5], conversations()

    async def run() -> list[float]:
        async with AsyncRewardClient(url, concurrency=32) as client:
            calls = []
            for i in range(100):
                calls += [client.score(target), client.score(others[i % len(others)]), client.score(others[(7 * i) % len(others)])]
            return [float(s) for s in (await asyncio.gather(*calls))[0::3]]

    return asyncio.run(run())
