"""Preprocessing cost of per-turn scores (SCORE_TURNS) against the number of assistant turns: the time
of `ChatTokenizer.encode(..., all_turns=True)` and, beside it, of the last turn only. Linear per-turn
preprocessing keeps the ratio between the two flat as turns grow.

    python -m benchmarks.per_turn --checkpoint .build/demo-checkpoint --turns 16,32,64,127,254
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from reward_server.templating import ChatTokenizer


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a careful assistant."}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: what is {turn} times {turn + 1}?"})
        messages.append({"role": "assistant", "content": f"{turn} times {turn + 1} is {turn * (turn + 1)}."})
    return messages


def seconds(call, repeats: int) -> float:
    """The best of `repeats` runs (the machine's noise only ever adds time)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path(".build/demo-checkpoint"))
    parser.add_argument("--turns", default="16,32,64,127,254", help="comma-separated assistant-turn counts")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    chat = ChatTokenizer(str(args.checkpoint), max_tokens=1 << 20, max_turns=1 << 20)
    print(f"{'turns':>6} {'tokens':>7} {'per-turn s':>11} {'last turn s':>12} {'ratio':>6}")
    for turns in (int(t) for t in args.turns.split(",")):
        payload = json.dumps(conversation(turns)).encode()
        ids, _ = chat.encode(payload, all_turns=True)
        every = seconds(lambda payload=payload: chat.encode(payload, all_turns=True), args.repeats)
        last = seconds(lambda payload=payload: chat.encode(payload), args.repeats)
        print(f"{turns:>6} {len(ids):>7} {every:>11.4f} {last:>12.4f} {every / last:>6.1f}")


if __name__ == "__main__":
    main()
