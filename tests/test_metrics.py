"""Triton's own metrics on the metrics port count the requests made."""

from __future__ import annotations

import re
import time
import urllib.request

from reward_client import RewardClient

GOOD = [{"role": "user", "content": "Count me."}, {"role": "assistant", "content": "Counted."}]


def success_count(metrics_url: str, model: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    match = re.search(rf'^nv_inference_request_success{{model="{model}",version="1"}} (\S+)$', text, re.MULTILINE)
    assert match, f"nv_inference_request_success for {model} not exported"
    return float(match.group(1))


def test_request_success_counts_requests(server):
    before = success_count(server.metrics_url, "reward_model")
    with RewardClient(server.grpc_url) as client:
        client.score_batch([GOOD] * 5)
    with RewardClient(server.http_url) as client:
        for _ in range(2):
            client.score(GOOD)
    # Triton counts a request when it releases it, which can come just after the client has its response.
    deadline = time.monotonic() + 10
    while success_count(server.metrics_url, "reward_model") - before < 7 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert success_count(server.metrics_url, "reward_model") - before == 7
