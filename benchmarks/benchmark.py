"""`make bench`: reward-model throughput, every system on the same checkpoint, workload and precision, in one run.

Systems
  (a) transformers, one conversation at a time (the model card's recipe as one forward; only the
      last position's logits are computed)
  (b) transformers, padded batches of 8 (NeMo-Aligner's / OpenRLHF's reward-server recipe: right
      padding, trunk forward, head at each row's last real token)
  (c) this project's engine in-process (packed, token-budget steps, shared-prefix reuse)
  (d) the whole server through reward_client at concurrency 16, over gRPC and HTTP
On the long and short mixes (c) x (a) is measured a second time with the two alternating chunk by chunk
(alternating_ratio): the ratio a noisy machine's separate runs cannot give.
Workloads (fixed seeds, real tokenizer)
  long: 64 conversations of 100-3,000 tokens; short: 256 of 30-300; best-of-8: one 2,000-token
  prompt with 8 responses of 100-300 tokens; rlhf: 4 such groups (`--rlhf-prompts`), every response its own request (as
  OpenRLHF and verl send them), with the prefix cache off and on (`--prefix-cache-tokens`): one after
  another (the cost of each later request of a group against its first), at concurrency 8 (a group's 8
  requests at once), and as 8 streams (8 groups in flight, each sending its responses one after another, as
  when responses finish at different times); no (a): its "x (a)" column is against the engine with the cache off.
MFU counts only the FLOPs a system computes: prompts reused within a step or from the prefix cache are
left out (estimated from the workload: in-step groups per call of up to `concurrency` requests).

    python -m benchmarks.benchmark --checkpoint .build/bench-checkpoint --dtype fp32 --out bench-results.json

On a GPU: build a larger checkpoint (e.g. `--preset llama8b-shape`-sized via your own config) and
run with `--device cuda --dtype bf16`; the table then reports MFU against the measured bf16 peak.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import server_times
from reward_client import AsyncRewardClient, RewardClient
from reward_server.batching import shared_prefixes
from reward_server.prefix_cache import BLOCK_TOKENS, block_keys
from reward_server.runtimes.torch_runtime import DTYPES, TorchRewardEngine
from tests.live_server import REPO, Server, start_server, stop_server

Conversation = list[dict[str, str]]
MIXES = {"long": (64, 100, 3000), "short": (256, 30, 300)}  # conversations, fewest and most tokens (WorkloadMaker.mix)
BEST_OF_REPEATS = 5  # best-of-8 is one call: the median of this many timed ones


# ----------------------------------------------------------------------------- workloads


class WorkloadMaker:
    """Conversations of a target templated length, from single-token English words of the real vocabulary."""

    def __init__(self, tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.rng = np.random.default_rng(seed)
        vocab = tokenizer.get_vocab()
        self.words = sorted(piece[1:] for piece in vocab if re.fullmatch(r"Ġ[a-z]{3,9}", piece))

    def text(self, tokens: int) -> str:
        return " ".join(self.rng.choice(self.words, size=max(tokens, 1)))

    def length(self, conversation: Conversation) -> int:
        return len(self.tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False))

    def conversation(self, total: int) -> Conversation:
        overhead = self.length([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]) - 2
        body = max(total - overhead, 2)
        user = max(int(body * self.rng.uniform(0.2, 0.5)), 1)
        return [{"role": "user", "content": self.text(user)}, {"role": "assistant", "content": self.text(body - user)}]

    def mix(self, count: int, low: int, high: int) -> list[Conversation]:
        return [self.conversation(int(n)) for n in self.rng.integers(low, high + 1, size=count)]

    def best_of(self, n: int, prompt_tokens: int, low: int, high: int) -> tuple[Conversation, list[str]]:
        prompt = [{"role": "user", "content": self.text(prompt_tokens - 30)}]
        return prompt, [self.text(int(k)) for k in self.rng.integers(low, high + 1, size=n)]


# ----------------------------------------------------------------------------- measuring


@dataclass
class Result:
    system: str
    workload: str
    dtype: str
    conversations: int
    tokens: int
    seconds: float
    p50_ms: float
    p99_ms: float
    flops: float
    tokens_per_s: float = 0.0
    conversations_per_s: float = 0.0
    ratio_to_a: float = 0.0
    mfu: float = 0.0


def model_flops(config, lengths: list[int], reused: list[int] | None = None) -> float:
    """Forward FLOPs: 2 x non-embedding parameters per token + causal attention (2 * layers * d * L^2 per
    sequence), less those of each sequence's first `reused` tokens (not computed)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size
    reused = reused or [0] * len(lengths)
    return float(sum(2 * layers * per_layer * (n - p) + 2 * layers * d * (n * n - p * p) for n, p in zip(lengths, reused, strict=True)))


def reused_tokens(ids: list[np.ndarray], batch: int, cache: bool, min_prefix: int = 64) -> list[int]:
    """Leading tokens of each sequence that a system reuses instead of computing, sequences scored in calls
    of `batch`: a group sharing a prompt in one call computes it once (batching.shared_prefixes); with a
    prefix cache, whole blocks that an earlier call computed are reused too."""
    reused, seen = [0] * len(ids), set()
    for start in range(0, len(ids), batch):
        chunk = list(range(start, min(start + batch, len(ids))))
        for length, members in shared_prefixes([ids[i] for i in chunk], min_prefix):
            for m in members[1:]:
                reused[chunk[m]] = length
        if cache:
            for i in chunk:
                keys = block_keys(ids[i], (len(ids[i]) - 1) // BLOCK_TOKENS)
                hits = next((j for j, key in enumerate(keys) if key not in seen), len(keys))
                reused[i] = max(reused[i], hits * BLOCK_TOKENS)
            for i in chunk:
                seen.update(block_keys(ids[i], len(ids[i]) // BLOCK_TOKENS))
    return reused


def matmul_peak(dtype: torch.dtype, device: str, size: int, seconds: float = 2.0) -> float:
    """FLOP/s of a square matmul, the best of repeated runs."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    latencies = run()
    return time.perf_counter() - start, latencies


# ----------------------------------------------------------------------------- systems


class Systems:
    def __init__(self, checkpoint: Path, dtype: str, device: str, cuda_graphs: bool = False) -> None:
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[dtype]).to(device).eval()
        self.config = self.hf.config
        self.engine = TorchRewardEngine(str(checkpoint), device=device, dtype=dtype, cuda_graphs=cuda_graphs)

    def ids(self, conversations: list[Conversation]) -> list[np.ndarray]:
        return [np.array(self.tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in conversations]

    @torch.inference_mode()
    def one_at_a_time(self, ids: list[np.ndarray]) -> list[float]:
        latencies = []
        for seq in ids:
            start = time.perf_counter()
            self.hf(torch.from_numpy(seq)[None].to(self.device), logits_to_keep=1).logits[0, -1, 0].item()
            latencies.append(time.perf_counter() - start)
        return latencies

    @torch.inference_mode()
    def padded_batches(self, ids: list[np.ndarray], batch: int = 8) -> list[float]:
        latencies = []
        row0 = self.hf.lm_head.weight[:1]
        for i in range(0, len(ids), batch):
            chunk = ids[i : i + batch]
            start = time.perf_counter()
            width = max(len(s) for s in chunk)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, seq in enumerate(chunk):
                input_ids[row, : len(seq)] = torch.from_numpy(seq)
                mask[row, : len(seq)] = 1
            hidden = self.hf.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            last = hidden[torch.arange(len(chunk)), mask.sum(1).to(self.device) - 1]
            (last.float() @ row0.float().T).cpu()
            latencies += [time.perf_counter() - start] * len(chunk)
        return latencies

    def engine_in_process(self, ids: list[np.ndarray], concurrency: int = 16, engine: TorchRewardEngine | None = None) -> list[float]:
        """The engine fed the way the server feeds it: up to `concurrency` sequences per call. Keeps each
        call's wait for the device after its last step's launch in `call_waits`."""
        engine = engine or self.engine
        latencies, self.call_waits = [], []
        for i in range(0, len(ids), concurrency):
            start = time.perf_counter()
            engine.score(ids[i : i + concurrency])
            sync(self.device)
            latencies += [time.perf_counter() - start] * len(ids[i : i + concurrency])
            self.call_waits.append(engine.device_wait)
        return latencies


def alternating_ratio(first: Callable[[list], object], second: Callable[[list], object], ids: list, chunk: int = 16) -> float:
    """How many times faster `second` runs than `first`, both fed the same chunks, one after the other,
    which goes first alternating: a shared machine's swings then fall on both (separate runs of each
    moved the long mix's (c) from 0.81x to 1.12x (a) on one CPU in one day)."""
    spent = [0.0, 0.0]
    for k, start in enumerate(range(0, len(ids), chunk)):
        part = ids[start : start + chunk]
        for which in (0, 1) if k % 2 == 0 else (1, 0):
            seconds, _ = timed(lambda run=(first, second)[which], part=part: run(part))
            spent[which] += seconds
    return spent[0] / spent[1]


def rlhf_groups(maker: WorkloadMaker, prompts: int, n: int = 8) -> list[Conversation]:
    """`prompts` groups of n responses of 100-300 tokens to one 2,000-token prompt, one conversation per
    response, group after group (the order RLHF trainers send them in)."""
    groups = [maker.best_of(n, 2000, 100, 300) for _ in range(prompts)]
    return [[*prompt, {"role": "assistant", "content": r}] for prompt, responses in groups for r in responses]


def rlhf_in_flight(maker: WorkloadMaker, prompts: int, n: int = 8) -> list[Conversation]:
    """rlhf_groups' `prompts` groups in flight side by side, one request of each in turn (response 0 of every
    group, then response 1, ...): sent as `prompts` streams (through_server's `streams`), each group's
    responses go one after another while the other groups' are in flight, as when a trainer's responses
    finish at different times (asynchronous rollouts) instead of a whole group at once."""
    convs = rlhf_groups(maker, prompts, n)
    return [convs[g * n + r] for r in range(n) for g in range(prompts)]


def group_costs(latencies: list[float], n: int = 8, echo: bool = False) -> dict[str, float]:
    """Each later request of a group of n sent one after another, against the group's first: mean and worst."""
    ratios = [later / latencies[g] for g in range(0, len(latencies), n) for later in latencies[g + 1 : g + n]]
    costs = {"mean": float(np.mean(ratios)), "worst": float(np.max(ratios))}
    if echo:
        print(f"    later requests of a group: {costs['mean']:.2f}x the first (worst {costs['worst']:.2f}x)", flush=True)
    return costs


def through_server(url: str, conversations: list[Conversation], concurrency: int = 16, streams: bool = False) -> list[float]:
    """Client-side latency per conversation with `concurrency` requests in flight (one asyncio client).
    `streams`: conversation i is sent by stream i % concurrency, each stream one request after another
    (rlhf_in_flight's order: a stream is one group); else each goes out as soon as a slot is free."""

    async def run() -> list[float]:
        slots = asyncio.Semaphore(concurrency)
        latencies = [0.0] * len(conversations)
        async with AsyncRewardClient(url, concurrency=concurrency) as client:

            async def one(i: int) -> None:
                async with slots:  # latency from send to answer, not time spent waiting for a slot
                    start = time.perf_counter()
                    await client.score(conversations[i])
                    latencies[i] = time.perf_counter() - start

            async def stream(first: int) -> None:
                for i in range(first, len(conversations), concurrency):
                    await one(i)

            await asyncio.gather(*(stream(k) for k in range(concurrency)) if streams else (one(i) for i in range(len(conversations))))
        return latencies

    return asyncio.run(run())


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / ".build" / "bench-checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default="long,short,best-of-8", help="comma-separated subset")
    parser.add_argument("--no-server", action="store_true", help="skip (d)")
    parser.add_argument("--rlhf-prompts", type=int, default=4, help="groups of 8 responses in the rlhf workload")
    parser.add_argument("--prefix-cache-tokens", type=int, default=65536, help="the prefix cache of rlhf's cache-on runs")
    parser.add_argument("--cuda-graphs", action="store_true", help="(c) and (d) with cuda_graphs on (a GPU)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results.json")
    args = parser.parse_args()
    args.checkpoint = args.checkpoint.resolve()
    if args.cuda_graphs and "rlhf" in args.workloads.split(","):  # its cache-on side runs the loop, which graphs cannot capture
        parser.error("--cuda-graphs with the rlhf workload would compare graphs and the prefix cache at once: run rlhf without it")

    systems = Systems(args.checkpoint, args.dtype, args.device, args.cuda_graphs)
    maker = WorkloadMaker(systems.tokenizer, seed=2024)
    workloads = {name: maker.mix(*shape) for name, shape in MIXES.items()}
    prompt, responses = maker.best_of(8, 2000, 100, 300)
    best_of = [[*prompt, {"role": "assistant", "content": r}] for r in responses]
    chosen = args.workloads.split(",")

    size = 8192 if args.device.startswith("cuda") else 2048
    # fp8 against the peak of the dtype its activations compute in (DTYPES: bf16)
    peak = {name: matmul_peak(DTYPES[name], args.device, size) for name in sorted({"fp32", "bf16", args.dtype})}
    print(f"matmul peak on {args.device}: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()), flush=True)

    results: list[Result] = []
    request_costs: dict[str, dict[str, float]] = {}
    server_steps: dict[str, dict[str, float]] = {}
    alternating: dict[str, float] = {}  # (c) x (a) by alternating_ratio, per mix
    server = None
    workdir = Path(tempfile.mkdtemp(prefix="reward-bench-"))
    stop_on_sigterm()
    interrupted = False
    if not args.no_server:
        settings = {"REWARD_CHECKPOINT": str(args.checkpoint), "REWARD_DTYPE": args.dtype, "REWARD_DEVICE": args.device, **server_times.ENV}
        settings["REWARD_CUDA_GRAPHS"] = str(args.cuda_graphs).lower()
    try:
        if not args.no_server:
            server = start_server(workdir / "server.log", env=settings)

        def record(
            system: str,
            workload: str,
            ids: list[np.ndarray],
            run: Callable[[], object],
            one_call: bool = False,
            reused: list[int] | None = None,
            warmup: Callable[[], object] | None = None,
            observed: Server | None = None,
            repeats: int = 1,
        ) -> list[float]:
            """`run` returns per-conversation latencies, unless `one_call` (then every latency is the call's);
            `reused`: leading tokens of each sequence the system does not compute (reused_tokens);
            `warmup`: other work to warm up on (default: the same; a prefix cache would remember it);
            `observed`: the server `run` goes to, whose time in the timed runs is kept (server_times.since);
            `repeats`: timed runs, the median one kept (one short call is one sample of a noisy machine)."""
            (warmup or run)()
            before = server_times.snapshot(observed) if observed is not None else None
            seconds, latencies = sorted((timed(run) for _ in range(repeats)), key=lambda t: t[0])[repeats // 2]
            if observed is not None:
                server_steps[f"{workload}: {system}"] = spent = server_times.since(observed, before, one_at_a_time=one_call)
                print(f"    the server's time: {server_times.describe(spent)}", flush=True)
            latencies = [seconds] * len(ids) if one_call else latencies
            lengths = [len(s) for s in ids]
            results.append(
                Result(
                    system,
                    workload,
                    args.dtype,
                    len(ids),
                    sum(lengths),
                    seconds,
                    1000 * statistics.median(latencies),
                    1000 * float(np.percentile(latencies, 99)),
                    model_flops(systems.config, lengths, reused),
                )
            )
            print(f"  {system:<28} {workload:<10} {sum(lengths) / seconds:>10.0f} tokens/s", flush=True)
            return latencies

        for name in [w for w in ("long", "short") if w in chosen]:
            convs = workloads[name]
            ids = systems.ids(convs)
            record("a transformers 1-by-1", name, ids, lambda ids=ids: systems.one_at_a_time(ids))
            record("b transformers padded x8", name, ids, lambda ids=ids: systems.padded_batches(ids))
            in_step = reused_tokens(ids, 16, False)
            calls = record("c engine in-process", name, ids, lambda ids=ids: systems.engine_in_process(ids), reused=in_step)
            call_ms, wait_ms = 1e3 * float(np.mean(calls[::16])), 1e3 * float(np.mean(systems.call_waits))  # (c)'s measured run
            alternating[name] = alternating_ratio(systems.one_at_a_time, systems.engine_in_process, ids)
            print(f"  (c) x (a), the two alternating chunk by chunk: {alternating[name]:.2f}", flush=True)
            server_steps[f"{name}: c"] = {  # what (c)'s calls of 16 were, beside the server's steps
                "tokens_per_call": sum(len(s) for s in ids) / -(-len(ids) // 16),
                "ms_per_call": call_ms,
                "device_wait_ms_per_call": wait_ms,  # after its last step's launch
            }
            if server is not None:
                # Were the server's steps as large as (c)'s calls, and as busy on the device? A wait near 0 where (c)'s is not:
                # the server's host is what the steps wait for; the engine's busy share below 1: the time between its steps.
                for system, url in (("d server gRPC c=16", server.grpc_url), ("d server HTTP c=16", server.http_url)):
                    record(system, name, ids, lambda url=url, convs=convs: through_server(url, convs), observed=server)
        if "best-of-8" in chosen:
            ids = systems.ids(best_of)
            record("a transformers 1-by-1", "best-of-8", ids, lambda: systems.one_at_a_time(ids))
            record("c engine, 8 separately", "best-of-8", ids, lambda: systems.engine_in_process(ids, concurrency=1))
            in_step = reused_tokens(ids, len(ids), False)
            engine_call = lambda: systems.engine.score(ids)  # noqa: E731
            record("c engine, prefix reuse", "best-of-8", ids, engine_call, one_call=True, reused=in_step, repeats=BEST_OF_REPEATS)
            if server is not None:
                with RewardClient(server.grpc_url) as client:
                    run = lambda: client.score_responses(prompt, responses)  # noqa: E731
                    record("d server score_responses", "best-of-8", ids, run, True, in_step, observed=server, repeats=BEST_OF_REPEATS)
        if "rlhf" in chosen:
            # No (a) here: transformers' copy of the weights makes room for the cache's engine and server (five copies of
            # an 8B model and two caches did not fit an 80 GB GPU)
            systems.hf = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            # Every measurement of a cache-on system on prompts it has not seen (warm-up included): the cache remembers.
            convs, warm = rlhf_groups(maker, args.rlhf_prompts), rlhf_groups(maker, 1)
            ids, warm_ids = systems.ids(convs), systems.ids(warm)
            concurrent, in_flight = rlhf_groups(maker, args.rlhf_prompts), rlhf_in_flight(maker, 8)
            options = dict(device=args.device, dtype=args.dtype, prefix_cache_tokens=args.prefix_cache_tokens)
            cached = TorchRewardEngine(str(args.checkpoint), **options)
            for label, engine, cache in (("off", systems.engine, False), ("on", cached, True)):
                run, warm_run = (lambda e=engine, i=i: systems.engine_in_process(i, 1, e) for i in (ids, warm_ids))
                latencies = record(f"c engine c=1, cache {label}", "rlhf", ids, run, reused=reused_tokens(ids, 1, cache), warmup=warm_run)
                request_costs[f"c engine c=1, cache {label}"] = group_costs(latencies, echo=True)
            if server is not None:
                # the cache runs the per-sequence loop, which graphs cannot capture
                env = {**settings, "REWARD_PREFIX_CACHE_TOKENS": str(args.prefix_cache_tokens), "REWARD_CUDA_GRAPHS": "false"}
                for label, cache in (("off", False), ("on", True)):
                    if cache:  # one server at a time on the device: the cache-off one makes way
                        stop_uninterrupted(server)
                        server = start_server(workdir / "server-cache.log", env=env)
                    # a group's 8 requests at once (in-step reuse computes its prompt about once), then 8 groups
                    # in flight, each a stream of one request after another (only the cache can reuse a prompt)
                    arrangements = ((1, convs, False, "c=1"), (8, concurrent, False, "c=8"), (8, in_flight, True, "8 streams"))
                    for c, timed_convs, streams, name in arrangements:
                        url = server.grpc_url
                        run, warm_run = (lambda u=url, w=w, c=c, s=streams: through_server(u, w, c, s) for w in (timed_convs, warm))
                        system, timed_ids = f"d gRPC {name}, cache {label}", systems.ids(timed_convs)
                        reused = reused_tokens(timed_ids, c, cache)
                        latencies = record(system, "rlhf", timed_ids, run, reused=reused, warmup=warm_run, observed=server)
                        if c == 1:
                            request_costs[system] = group_costs(latencies, echo=True)
    except Interrupted:
        interrupted = True
        print("interrupted (SIGTERM): what was measured follows", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # measuring is over (a SIGTERM now would leave the server running)
        if server is not None:
            stop_server(server)
        shutil.rmtree(workdir, ignore_errors=True)

    baseline = {}  # (a) where it ran; else the workload's first row (rlhf: the engine with the cache off)
    for r in results:
        r.tokens_per_s = r.tokens / r.seconds
        r.conversations_per_s = r.conversations / r.seconds
        r.mfu = r.flops / r.seconds / peak[args.dtype]
        if r.workload not in baseline or r.system.startswith("a "):
            baseline[r.workload] = r
    for r in results:  # in tokens/s: rlhf's arrangements score different conversations
        r.ratio_to_a = r.tokens_per_s / baseline[r.workload].tokens_per_s
    print_table(results)
    for system, costs in request_costs.items():
        print(f"rlhf one request after another, {system}: later requests cost {costs['mean']:.2f}x (worst {costs['worst']:.2f}x) the first")
    for name, ratio in alternating.items():
        print(f"{name}: (c) x (a) alternating chunk by chunk {ratio:.2f} (the table's, from separate runs: the rows above)")
    report = {
        "machine": {"platform": platform.platform(), "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__},
        "matmul_peak_flops": peak,
        "checkpoint": str(args.checkpoint),
        "results": [asdict(r) for r in results],
        "rlhf_request_cost": request_costs,
        "server_steps": server_steps,
        "c_over_a_alternating": alternating,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    if interrupted:
        sys.exit(143)


class Interrupted(Exception):
    """SIGTERM (e.g. `timeout`'s) during a benchmark: it stops measuring, stops its servers (else left running: they
    run in sessions of their own) and reports what it measured."""


def stop_uninterrupted(server: Server) -> None:
    """stop_server with SIGTERM held off: a server whose stop is cut short is left running (a session of its own)."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        stop_server(server)
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_on_sigterm() -> None:
    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the servers' stop must not be cut short in turn
        raise Interrupted

    signal.signal(signal.SIGTERM, interrupt)


def print_table(results: list[Result]) -> None:
    header = (
        f"{'system':<28} {'workload':<10} {'dtype':<5} {'tokens/s':>9} {'conv/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'x (a)':>6} {'MFU':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.system:<28} {r.workload:<10} {r.dtype:<5} {r.tokens_per_s:>9.0f} {r.conversations_per_s:>8.1f} "
            f"{r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {r.ratio_to_a:>6.2f} {r.mfu:>6.1%}"
        )


if __name__ == "__main__":
    main()
