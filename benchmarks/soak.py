"""`make soak`: bounded loopback load against a fresh server; 0 unexpected errors and flat memory.

    python -m benchmarks.soak [--seconds 60] [--concurrency 64] [--warmup 10]

Sends the corpus's conversations (and, one in twenty, a conversation the server must refuse) with
`concurrency` requests in flight, samples the resident memory of the server's processes (tritonserver
and its python-backend stubs) every second, and prints a report. Fails (exit 1) on any unexpected
error, any wrong score, or memory growing more than 10 % between the end of the warm-up and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from reward_client import AsyncRewardClient, InvalidConversationError
from tests.corpus import conversations
from tests.live_server import start_server, stop_server

BAD = [{"role": "user", "content": "x " * 5000}, {"role": "assistant", "content": "too long"}]
MAX_GROWTH = 0.10


def rss_bytes(root: int) -> int:
    """Resident memory of `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
        except (OSError, StopIteration):
            continue
    return total


async def soak(url: str, root: int, seconds: float, warmup: float, concurrency: int, expected: dict[int, float]) -> dict:
    convs = conversations()
    stats = {"ok": 0, "refused": 0, "unexpected": [], "wrong": 0, "latencies": [], "memory": []}
    deadline = time.monotonic() + warmup + seconds

    async with AsyncRewardClient(url, concurrency=concurrency) as client:

        async def worker(index: int) -> None:
            n = index
            while time.monotonic() < deadline:
                n += concurrency
                started = time.perf_counter()
                try:
                    if n % 20 == 0:
                        try:
                            await client.score(BAD)
                            stats["unexpected"].append("an over-long conversation was scored")
                        except InvalidConversationError:
                            stats["refused"] += 1
                        continue
                    k = n % len(convs)
                    score = await client.score(convs[k])
                    stats["ok"] += 1
                    stats["wrong"] += abs(float(score) - expected[k]) > 1e-4
                    stats["latencies"].append(time.perf_counter() - started)
                except Exception as exc:
                    stats["unexpected"].append(repr(exc))

        async def sample() -> None:
            start = time.monotonic()
            while time.monotonic() < deadline:
                stats["memory"].append((time.monotonic() - start, rss_bytes(root)))
                await asyncio.sleep(1)

        await asyncio.gather(sample(), *(worker(i) for i in range(concurrency)))
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="measured load after the warm-up (default: 60)")
    parser.add_argument("--warmup", type=float, default=10, help="load before memory is compared (default: 10)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default: 64)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = start_server(Path(folder) / "server.log")
        try:
            from reward_client import RewardClient

            with RewardClient(server.grpc_url) as client:  # expected scores, one by one, before the load
                expected = {k: float(s) for k, s in enumerate(client.score_batch(conversations()))}
            stats = asyncio.run(soak(server.grpc_url, server.process.pid, args.seconds, args.warmup, args.concurrency, expected))
        finally:
            stop_server(server)
    memory = [(t, m) for t, m in stats["memory"] if t >= args.warmup]
    growth = memory[-1][1] / memory[0][1] - 1 if len(memory) > 1 else 0.0
    latencies = np.array(stats["latencies"]) * 1000
    print(f"soak: {args.seconds:.0f} s after {args.warmup:.0f} s warm-up, concurrency {args.concurrency}")
    print(f"  scored {stats['ok']} ({stats['ok'] / (args.seconds + args.warmup):.1f}/s), refused as expected {stats['refused']}")
    print(f"  latency ms: p50 {np.percentile(latencies, 50):.0f}  p99 {np.percentile(latencies, 99):.0f}  max {latencies.max():.0f}")
    print(f"  unexpected errors: {len(stats['unexpected'])}  wrong scores: {stats['wrong']}")
    for error in stats["unexpected"][:5]:
        print(f"    {error}")
    start_mib, end_mib = memory[0][1] / 2**20, memory[-1][1] / 2**20
    print(f"  server memory (RSS, all processes): {start_mib:.0f} MiB after warm-up -> {end_mib:.0f} MiB ({growth:+.1%})")
    ok = not stats["unexpected"] and not stats["wrong"] and growth <= MAX_GROWTH
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
