"""`reward-client`: score conversations, annotate JSONL datasets, evaluate on RewardBench.

    reward-client score conversation.json                      # one JSON conversation (or - for stdin)
    reward-client score --turns conversation.json              # a score per assistant turn
    reward-client --url grpc://rm-0:8001 --url grpc://rm-1:8001 annotate --input-file in.jsonl --output-file out.jsonl
    reward-client rewardbench --data filtered.jsonl --output-json results.json

Exit status: 0 when everything was scored, 1 when some records or pairs failed (they are listed),
2 for bad usage or unreadable input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from reward_client import annotate as annotation
from reward_client import rewardbench
from reward_client.client import AsyncRewardClient
from reward_client.config import DEFAULT_CONCURRENCY, TLS, Retry, Timeout
from reward_client.errors import RewardClientError
from reward_client.scores import Score


def _score_json(score: Score) -> dict[str, Any]:
    return {"reward": float(score), "attributes": dict(score.attributes)}


async def run_score(client: AsyncRewardClient, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    try:
        conversations = [json.loads(text)]
    except json.JSONDecodeError:  # JSON lines: one conversation each
        conversations = [json.loads(line) for line in text.splitlines() if line.strip()]
    for conversation in conversations:
        if args.turns:
            print(json.dumps([_score_json(s) for s in await client.score_turns(conversation)]))
        else:
            print(json.dumps(_score_json(await client.score(conversation))))
    return 0


async def run_annotate(client: AsyncRewardClient, args: argparse.Namespace) -> int:
    errors_file = args.errors_file or args.output_file.with_name(args.output_file.name + ".errors.jsonl")
    total = sum(1 for line in args.input_file.open(encoding="utf-8") if line.strip())
    with tqdm(total=total, desc="annotate", unit="record", disable=args.quiet) as bar:
        summary = await annotation.annotate(
            client, args.input_file, args.output_file, errors_file, args.format, args.concurrency, progress=bar.update
        )
    print(f"{summary.written} written, {summary.skipped} already done, {summary.failed} failed", file=sys.stderr)
    if summary.failed:
        print(f"failed records (retried by the next run): {errors_file}", file=sys.stderr)
    return 1 if summary.failed else 0


async def run_rewardbench(client: AsyncRewardClient, args: argparse.Namespace) -> int:
    rows = rewardbench.load(args.data)

    with tqdm(total=len(rows), desc="rewardbench", unit="pair", disable=args.quiet) as bar:

        async def pair(row: dict[str, Any]) -> tuple[float, float]:
            try:  # both responses in one request: the prompt is computed once
                chosen, rejected = await client.score_responses(row["prompt"], [row["chosen"], row["rejected"]])
                return float(chosen), float(rejected)
            finally:
                bar.update(1)

        outcomes = await asyncio.gather(*(pair(row) for row in rows), return_exceptions=True)
    failed = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    for i, error in failed:
        print(f"pair {i} ({rows[i]['subset']}): {type(error).__name__}: {error}", file=sys.stderr)
    scored = [(row, o) for row, o in zip(rows, outcomes, strict=True) if not isinstance(o, BaseException)]
    subsets = [row["subset"] for row, _ in scored]
    accuracy = rewardbench.subset_accuracy(subsets, [c for _, (c, _) in scored], [r for _, (_, r) in scored])
    sections = rewardbench.section_scores(accuracy)
    report = {"sections": sections, "subsets": accuracy, "pairs": dict(Counter(subsets)), "failed": len(failed)}
    report["unweighted_subsets"] = rewardbench.others(accuracy)
    if args.output_json:
        args.output_json.write_text(json.dumps(report, indent=2) + "\n")
    print(rewardbench.table(accuracy, sections, report["pairs"]))
    return 1 if failed else 0


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="reward-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    main.add_argument("--url", action="append", help="server URL; repeat for failover (default: localhost:8001, gRPC)")
    main.add_argument("--model", default="reward_model", help="Triton model name (default: reward_model)")
    main.add_argument("--timeout", type=float, default=Timeout.request, help=f"seconds per request (default: {Timeout.request:g})")
    main.add_argument("--connect-timeout", type=float, default=Timeout.connect, help=f"seconds to connect (default: {Timeout.connect:g})")
    main.add_argument(
        "--retries",
        type=int,
        default=Retry.attempts,
        help=f"rounds of tries per request over the server URLs (default: {Retry.attempts}; see Retry)",
    )
    main.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="extra request header; repeatable")
    main.add_argument("--ca-file", help="CA bundle for https:// and grpcs:// URLs")
    main.add_argument("--cert-file", help="client certificate (mutual TLS)")
    main.add_argument("--key-file", help="client key (mutual TLS)")
    main.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help=f"requests in flight (default: {DEFAULT_CONCURRENCY})")
    main.add_argument("--quiet", action="store_true", help="no progress bar")
    commands = main.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score conversations from a file or stdin; JSON lines on stdout")
    score.add_argument("file", help="a JSON conversation, or JSON lines of conversations; - for stdin")
    score.add_argument("--turns", action="store_true", help="a score for every assistant turn")

    annotate = commands.add_parser("annotate", help="label a NeMo-Aligner (or OpenAI-message) JSONL dataset; resumable")
    annotate.add_argument("--input-file", type=Path, required=True)
    annotate.add_argument("--output-file", type=Path, required=True, help="appended to; records already there are skipped")
    annotate.add_argument("--format", choices=annotation.FORMATS, default="steerlm", help="steerlm: 0-4 integers; float: raw values")
    annotate.add_argument("--errors-file", type=Path, help="records that failed (default: OUTPUT.errors.jsonl)")

    bench = commands.add_parser("rewardbench", help="per-subset accuracy and RewardBench section scores")
    bench.add_argument("--data", type=Path, required=True, help="JSON lines of prompt, chosen, rejected, subset")
    bench.add_argument("--output-json", type=Path, help="also write the results here")
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        headers = dict(h.split(":", 1) for h in args.header)
    except ValueError:
        parser().error("--header takes NAME:VALUE")
    try:
        timeout, retry = Timeout(connect=args.connect_timeout, request=args.timeout), Retry(attempts=args.retries)
    except ValueError as exc:
        parser().error(str(exc))
    options = dict(
        timeout=timeout,
        retry=retry,
        headers={k.strip(): v.strip() for k, v in headers.items()},
        tls=TLS(args.ca_file, args.cert_file, args.key_file),
        concurrency=args.concurrency,
        model=args.model,
    )
    run = {"score": run_score, "annotate": run_annotate, "rewardbench": run_rewardbench}[args.command]

    async def session() -> int:
        async with AsyncRewardClient(args.url or ["localhost:8001"], **options) as client:
            return await run(client, args)

    try:
        return asyncio.run(session())
    except RewardClientError as exc:  # first: some of these are also OSError / ValueError
        print(f"reward-client: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RecursionError) as exc:  # unreadable input, malformed data (RecursionError: nested too deeply)
        print(f"reward-client: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
