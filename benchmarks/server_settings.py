"""The server on one mix under several settings, side by side in one run with transformers one conversation
at a time (a) and the engine in-process fed 16 a call (c), as `make bench` runs them:

    python -m benchmarks.server_settings --checkpoint /tmp/rm-8b --dtype bf16 --mix short \\
        --settings "" "REWARD_CUDA_GRAPHS=true" "REWARD_CUDA_GRAPHS=true REWARD_SCORING_THREAD=true"

Each setting (space-separated REWARD_* assignments; "" for the defaults) starts its own server, which is
warmed up on the mix, then timed through reward_client over gRPC at concurrency 16 ((d) of benchmark.py);
where its time went in the timed run is read from its metrics and statistics (server_times.py). (a) and (c) run first and leave the device
before the servers start. Prints a line per system and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import server_times
from benchmarks.benchmark import (
    DTYPES,
    MIXES,
    Interrupted,
    Systems,
    WorkloadMaker,
    stop_on_sigterm,
    stop_uninterrupted,
    through_server,
    timed,
)
from reward_server.settings import parse_bool
from tests.live_server import start_server


def timed_rate(tokens: int, run: Callable[[], object]) -> float:
    """Tokens/s of `run`, after one run to warm up."""
    run()
    return tokens / timed(run)[0]


def in_process(checkpoint: Path, dtype: str, device: str, mix: str) -> tuple[list, int, dict[str, float]]:
    """The mix's conversations, their tokens, and (a)'s and (c)'s tokens/s; the models are dropped on return."""
    systems = Systems(checkpoint, dtype, device)
    conversations = WorkloadMaker(systems.tokenizer, seed=2024).mix(*MIXES[mix])
    ids = systems.ids(conversations)
    tokens = sum(len(s) for s in ids)
    rates = {
        "a transformers 1-by-1": timed_rate(tokens, lambda: systems.one_at_a_time(ids)),
        "c engine in-process": timed_rate(tokens, lambda: systems.engine_in_process(ids)),
    }
    for system, rate in rates.items():
        print(f"  {system:<60} {rate:>9.0f} tokens/s", flush=True)
    return conversations, tokens, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mix", choices=sorted(MIXES), default="short")
    parser.add_argument("--settings", nargs="+", default=[""], help='space-separated REWARD_* assignments per server ("": the defaults)')
    parser.add_argument("--out", type=Path, default=Path("server-settings.json"))
    args = parser.parse_args()
    checkpoint = args.checkpoint.resolve()

    conversations, tokens, rates = in_process(checkpoint, args.dtype, args.device, args.mix)
    gc.collect()  # the servers get the device to themselves
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    report = {"mix": args.mix, "tokens": tokens, "dtype": args.dtype, "systems": {}}
    base = {"REWARD_CHECKPOINT": str(checkpoint), "REWARD_DTYPE": args.dtype, "REWARD_DEVICE": args.device, **server_times.ENV}
    stop_on_sigterm()
    try:
        for setting in args.settings:
            env = {**base, **dict(assignment.split("=", 1) for assignment in setting.split())}
            system = f"d server gRPC c=16 {setting or '(defaults)'}"
            server = start_server(Path(tempfile.mkdtemp(prefix="reward-settings-")) / "server.log", env=env)
            try:
                through_server(server.grpc_url, conversations)  # the warm-up
                before = server_times.snapshot(server)
                rates[system] = tokens / timed(lambda url=server.grpc_url: through_server(url, conversations))[0]
                thread = parse_bool(env.get("REWARD_SCORING_THREAD", "false"), "REWARD_SCORING_THREAD")
                report["systems"][system] = server_times.since(server, before, scoring_thread=thread)
            finally:
                stop_uninterrupted(server)
            print(f"  {system:<60} {rates[system]:>9.0f} tokens/s  {server_times.describe(report['systems'][system])}", flush=True)
            write(report, rates, args.out)  # each server's figures kept as they come: a timeout loses none
    except Interrupted:
        print("interrupted (SIGTERM): what was measured follows", flush=True)
        write(report, rates, args.out, echo=True)
        sys.exit(143)
    write(report, rates, args.out, echo=True)


def write(report: dict, rates: dict[str, float], out: Path, echo: bool = False) -> None:
    """The report with every rate against (a) and (c), to `out` (and printed, if `echo`)."""
    a, c = rates["a transformers 1-by-1"], rates["c engine in-process"]
    for system, rate in rates.items():
        report["systems"].setdefault(system, {}).update(tokens_per_s=rate, x_a=rate / a, x_c=rate / c)
        if echo:
            print(f"{system:<60} {rate:>9.0f} tokens/s  {rate / a:5.2f}x (a)  {rate / c:5.2f}x (c)")
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
