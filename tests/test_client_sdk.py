"""The SDK against the live server: async and sync twins, failover and retries, ranking helpers."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from reward_client import AsyncRewardClient, Retry, RewardClient, ServerUnavailableError, Timeout, preference
from tests.corpus import conversations
from tests.live_server import free_port

PROMPT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Which is the largest planet?"}]
RESPONSES = ["Jupiter.", "Saturn, I think.", "The largest planet in the solar system is Jupiter.", "Earth"]


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_async_and_sync_clients_agree(server, transport):
    url = server.grpc_url if transport == "grpc" else server.http_url
    convs = conversations()[:12]

    async def run_async():
        async with AsyncRewardClient(url, concurrency=4) as client:
            batch = await client.score_batch(convs)
            one = await client.score(convs[0])
            return batch, one, await client.score_responses(PROMPT, RESPONSES)

    batch, one, responses = asyncio.run(run_async())
    with RewardClient(url, concurrency=4) as client:
        sync_batch, sync_one, sync_responses = client.score_batch(convs), client.score(convs[0]), client.score_responses(PROMPT, RESPONSES)
    # Equal up to the engine's batch invariance (dynamic batching may pack the rows differently).
    assert np.abs(np.array(sync_batch) - np.array(batch)).max() <= 1e-5
    assert abs(sync_one - one) <= 1e-5 and abs(one - batch[0]) <= 1e-5
    assert np.abs(np.array(sync_responses) - np.array(responses)).max() <= 1e-5
    assert [s.attributes.keys() for s in sync_batch] == [s.attributes.keys() for s in batch]
    assert np.all(np.abs(np.diff(batch)) > 1e-4)  # twelve different values, in input order


def test_failover_to_the_next_server(server):
    """The first URL has nothing listening: every call still succeeds, on the second server."""
    dead = f"127.0.0.1:{free_port()}"
    with RewardClient(server.grpc_url) as direct:
        expected = direct.score_batch(conversations()[:6])
    with RewardClient([dead, server.grpc_url], retry=Retry(attempts=2, backoff=0.01)) as client:
        assert np.abs(np.array(client.score_batch(conversations()[:6])) - np.array(expected)).max() <= 1e-5
        assert client.is_ready()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_reset_connection_closes_only_after_its_last_call(server, transport):
    """reset() retires a connection: new calls open another, and the retired one stays open for the
    calls still on it, closing when the last one finishes."""
    url = server.grpc_url if transport == "grpc" else server.http_url

    async def run():
        async with AsyncRewardClient(url) as client:
            pipe = client._transports[0]
            async with pipe.connection() as old:
                await pipe.reset(old)
                assert old.retired and not old.closed
                await client.score(conversations()[0])  # on a new connection
                assert pipe._current is not None and pipe._current is not old and not old.closed
                assert await old.client.is_server_ready()  # the call still on the retired one works
            assert old.closed

    asyncio.run(run())


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_calls_survive_resets_racing_them(server, transport):
    """Connections reset over and over while 48 calls are in flight on them (what a restarting server
    does): no call ever lands on a closed channel or session, every call returns its score."""
    url = server.grpc_url if transport == "grpc" else server.http_url
    convs = conversations()[:6]

    async def run():
        async with AsyncRewardClient(url, concurrency=16, retry=Retry(attempts=1)) as client:
            expected = await client.score_batch(convs)
            done = asyncio.Event()

            async def resets() -> int:
                count = 0
                while not done.is_set():
                    await client._transports[0].reset()
                    count += 1
                    await asyncio.sleep(0.005)
                return count

            resetting = asyncio.create_task(resets())
            try:
                got = await asyncio.gather(*(client.score_batch(convs) for _ in range(8)))
            finally:
                done.set()
            return expected, got, await resetting

    expected, got, resets = asyncio.run(run())
    assert resets > 1
    for scores in got:
        assert np.abs(np.array(scores) - np.array(expected)).max() <= 1e-5


def test_retries_give_up_with_server_unavailable():
    dead = [f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    started = time.monotonic()
    with RewardClient(dead, retry=Retry(attempts=2, backoff=0.05, max_backoff=0.1), timeout=Timeout(connect=1, request=5)) as client:
        with pytest.raises(ServerUnavailableError):
            client.score(conversations()[0])
        assert not client.is_ready()
    assert time.monotonic() - started < 10


def test_headers_reach_the_server(server):
    """Custom headers (a bearer token) travel with every HTTP request: the launcher's front, keyed, scores with
    the key and refuses without it (Triton ignores unknown headers: against it alone this could not fail)."""
    from reward_client import PermissionDeniedError
    from tests.test_gateway import Running

    front = Running(server, api_keys=("sdk-key",))
    try:
        with RewardClient(front.url, headers={"Authorization": "Bearer sdk-key"}) as client:
            assert math.isfinite(client.score(conversations()[0]))
        with RewardClient(front.url, retry=Retry(attempts=1)) as keyless, pytest.raises(PermissionDeniedError):
            keyless.score(conversations()[0])
    finally:
        front.close()


def test_rank_compare_best_of_n(server):
    with RewardClient(server.grpc_url) as client:
        scores = client.score_responses(PROMPT, RESPONSES)
        ranked = client.rank(PROMPT, RESPONSES)
        assert [r.index for r in ranked] == list(np.argsort([-float(s) for s in scores], kind="stable"))
        assert [r.response for r in ranked] == [RESPONSES[r.index] for r in ranked]
        assert client.best_of_n(PROMPT, RESPONSES) == ranked[0]
        p = client.compare(PROMPT, RESPONSES[0], RESPONSES[1])
        assert p == pytest.approx(1 / (1 + math.exp(-(scores[0] - scores[1]))), abs=1e-6)
        assert client.compare(PROMPT, RESPONSES[1], RESPONSES[0]) == pytest.approx(1 - p, abs=1e-6)


def test_preference_is_bradley_terry_and_never_overflows():
    assert preference(2.0, 2.0) == 0.5
    assert preference(1.0, 0.0) == pytest.approx(0.7310585786, abs=1e-9)
    assert preference(0.0, 1000.0) == 0.0 and preference(1000.0, 0.0) == 1.0
