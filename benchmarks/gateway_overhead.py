"""The fronts' overhead: `make bench`'s long mix (64 conversations of 100-3,000 tokens, seed 2024) at
concurrency 16, scored three ways: direct gRPC to Triton (reward_client, a server without API keys), the
HTTP front's /v1/chat/completions (aiohttp, same server), and gRPC through the gRPC front (reward_client
with a key, a second server started with $REWARD_API_KEY; only one server works at a time). Each round
runs the three in a rotated order; prints each round's wall times and the median ratios to direct gRPC.

    python -m benchmarks.gateway_overhead --checkpoint .build/bench-checkpoint --rounds 6

Target (issue 15): each ≤ 1.05 x direct gRPC. Run it on a quiet machine.
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


KEY = "benchmark-key"


async def direct(url: str, conversations: list, headers: dict[str, str] | None = None) -> float:
    async with AsyncRewardClient(url, concurrency=CONCURRENCY, headers=headers) as client:
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
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    conversations = WorkloadMaker(AutoTokenizer.from_pretrained(args.checkpoint), seed=2024).mix(64, 100, 3000)
    env = {"REWARD_CHECKPOINT": str(args.checkpoint.resolve()), "REWARD_DTYPE": args.dtype, "REWARD_DEVICE": args.device}
    folder = Path(tempfile.mkdtemp(prefix="reward-gateway-"))
    plain = start_server(folder / "plain.log", env=env)
    keyed = None
    try:
        keyed = start_server(folder / "keyed.log", env={**env, "REWARD_API_KEY": KEY})
        ways = {
            "direct gRPC": lambda batch: direct(plain.grpc_url, batch),
            "HTTP gateway": lambda batch: gateway(plain.http_url, batch),
            "gRPC front": lambda batch: direct(keyed.grpc_url, batch, {"Authorization": f"Bearer {KEY}"}),
        }
        for way in ways.values():  # warm every path
            asyncio.run(way(conversations[:CONCURRENCY]))
        names = list(ways)
        ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
        for k in range(args.rounds):
            turn = k % len(names)
            order = names[turn:] + names[:turn]  # each way first, second and third in turn
            seconds = {name: asyncio.run(ways[name](conversations)) for name in order}
            for name in ratios:
                ratios[name].append(seconds[name] / seconds["direct gRPC"])
            shown = ", ".join(f"{name} {seconds[name]:.2f} s" for name in order)
            print(f"round {k}: {shown}; ratios " + ", ".join(f"{n} {r[-1]:.3f}" for n, r in ratios.items()), flush=True)
        for name, values in ratios.items():
            print(f"median {name} / direct gRPC: {statistics.median(values):.3f} (target <= 1.05)")
    finally:
        stop_server(plain)
        if keyed:
            stop_server(keyed)


if __name__ == "__main__":
    main()
