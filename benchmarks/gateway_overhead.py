"""The gateway's overhead: `make bench`'s long mix (64 conversations of 100-3,000 tokens, seed 2024) at
concurrency 16, direct gRPC (reward_client) against the front's /v1/chat/completions (aiohttp), on one
fresh server, alternating the two `--rounds` times; prints each round's wall time and the median ratio.

    python -m benchmarks.gateway_overhead --checkpoint .build/bench-checkpoint --rounds 5

Target (issue 15): gateway wall time ≤ 1.05 x direct gRPC. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from transformers import AutoTokenizer

from benchmarks.benchmark import WorkloadMaker
from reward_client import AsyncRewardClient
from tests.live_server import REPO, start_server, stop_server

CONCURRENCY = 16


async def direct(url: str, conversations: list) -> float:
    async with AsyncRewardClient(url, concurrency=CONCURRENCY) as client:
        start = time.perf_counter()
        await client.score_batch(conversations)
        return time.perf_counter() - start


async def gateway(url: str, conversations: list) -> float:
    slots = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:

        async def one(messages: list) -> None:
            async with slots, session.post(url + "/v1/chat/completions", json={"model": "m", "messages": messages}) as answer:
                answer.raise_for_status()
                await answer.read()

        start = time.perf_counter()
        await asyncio.gather(*(one(c) for c in conversations))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / ".build" / "bench-checkpoint")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    conversations = WorkloadMaker(AutoTokenizer.from_pretrained(args.checkpoint), seed=2024).mix(64, 100, 3000)
    env = {"REWARD_CHECKPOINT": str(args.checkpoint.resolve()), "REWARD_DTYPE": args.dtype, "REWARD_DEVICE": args.device}
    server = start_server(Path(tempfile.mkdtemp(prefix="reward-gateway-")) / "server.log", env=env)
    try:
        asyncio.run(direct(server.grpc_url, conversations[:CONCURRENCY]))  # warm both paths
        asyncio.run(gateway(server.http_url, conversations[:CONCURRENCY]))
        ratios = []
        for k in range(args.rounds):
            grpc = asyncio.run(direct(server.grpc_url, conversations))
            front = asyncio.run(gateway(server.http_url, conversations))
            ratios.append(front / grpc)
            print(f"round {k}: direct gRPC {grpc:.2f} s, gateway {front:.2f} s, ratio {front / grpc:.3f}", flush=True)
        print(f"median gateway / direct gRPC: {statistics.median(ratios):.3f} (target <= 1.05)")
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
