"""`make bench`: reward-model throughput, every system on the same checkpoint, workload and precision, in one run.

Systems
  (a) transformers, one conversation at a time (the model card's recipe as one forward; only the
      last position's logits are computed)
  (b) transformers, padded batches of 8 (NeMo-Aligner's / OpenRLHF's reward-server recipe: right
      padding, trunk forward, head at each row's last real token)
  (c) this project's engine in-process (packed, token-budget steps, shared-prefix reuse)
  (d) the whole server through reward_client at concurrency 16, over gRPC and HTTP
Workloads (fixed seeds, real tokenizer)
  long: 64 conversations of 100-3,000 tokens; short: 256 of 30-300; best-of-8: one 2,000-token
  prompt with 8 responses of 100-300 tokens.

    python tests/benchmark.py --checkpoint .build/bench-checkpoint --dtype fp32 --out bench-results.json

On a GPU: build a larger checkpoint (e.g. `--preset llama8b-shape`-sized via your own config) and
run with `--device cuda --dtype bf16`; the table then reports MFU against the measured bf16 peak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import shutil
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "model_repository" / "reward_engine" / "1"))
from torch_runtime import DTYPES, TorchRewardEngine  # noqa: E402

Conversation = list[dict[str, str]]


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


def model_flops(config, lengths: list[int]) -> float:
    """Forward FLOPs: 2 x non-embedding parameters per token + causal attention (2 * layers * d * L^2 per sequence)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size
    return float(sum(2 * layers * per_layer * n + 2 * layers * d * n * n for n in lengths))


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
    def __init__(self, checkpoint: Path, dtype: str, device: str) -> None:
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[dtype]).to(device).eval()
        self.engine = TorchRewardEngine(str(checkpoint), device=device, dtype=dtype)

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

    def engine_in_process(self, ids: list[np.ndarray], concurrency: int = 16) -> list[float]:
        """The engine fed the way the server feeds it: up to `concurrency` sequences per call."""
        latencies = []
        for i in range(0, len(ids), concurrency):
            start = time.perf_counter()
            self.engine.score(ids[i : i + concurrency])
            sync(self.device)
            latencies += [time.perf_counter() - start] * len(ids[i : i + concurrency])
        return latencies


def through_server(url: str, conversations: list[Conversation], concurrency: int = 16) -> list[float]:
    """Client-side latency per conversation with `concurrency` requests in flight (one asyncio client)."""
    from reward_client import AsyncRewardClient

    async def run() -> list[float]:
        slots = asyncio.Semaphore(concurrency)
        async with AsyncRewardClient(url, concurrency=concurrency) as client:

            async def one(conversation: Conversation) -> float:
                async with slots:  # latency from send to answer, not time spent waiting for a slot
                    start = time.perf_counter()
                    await client.score(conversation)
                    return time.perf_counter() - start

            return list(await asyncio.gather(*(one(c) for c in conversations)))

    return asyncio.run(run())


def repository_with(dtype: str, device: str, workdir: Path) -> Path:
    """A copy of model_repository whose engine runs at the benchmark's precision and device."""
    target = workdir / "model_repository"
    shutil.copytree(REPO / "model_repository", target)
    config = target / "reward_engine" / "config.pbtxt"
    text = re.sub(r'(key: "dtype", value: \{ string_value: )"[^"]*"', rf'\1"{dtype}"', config.read_text())
    text = re.sub(r'(key: "device", value: \{ string_value: )"[^"]*"', rf'\1"{device}"', text)
    config.write_text(text)
    for model in ("preprocessing", "reward_engine"):
        model_config = target / model / "config.pbtxt"
        model_config.write_text(model_config.read_text().replace("../../.build/", f"{REPO}/.build/"))
    return target


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / ".build" / "bench-checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default="long,short,best-of-8", help="comma-separated subset")
    parser.add_argument("--no-server", action="store_true", help="skip (d)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results.json")
    args = parser.parse_args()
    args.checkpoint = args.checkpoint.resolve()

    systems = Systems(args.checkpoint, args.dtype, args.device)
    maker = WorkloadMaker(systems.tokenizer, seed=2024)
    workloads = {"long": maker.mix(64, 100, 3000), "short": maker.mix(256, 30, 300)}
    prompt, responses = maker.best_of(8, 2000, 100, 300)
    best_of = [[*prompt, {"role": "assistant", "content": r}] for r in responses]
    chosen = args.workloads.split(",")

    size = 8192 if args.device.startswith("cuda") else 2048
    peak = {name: matmul_peak(DTYPES[name], args.device, size) for name in ("fp32", "bf16")}
    print(f"matmul peak on {args.device}: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s", flush=True)

    results: list[Result] = []
    server = None
    workdir = Path(tempfile.mkdtemp(prefix="reward-bench-"))
    if not args.no_server:  # the server side needs the client and tritonclient; a bare GPU box may lack them
        from reward_client import RewardClient

        from live_server import start_server, stop_server

        repository = repository_with(args.dtype, args.device, workdir)
        server = start_server(workdir / "server.log", model_repository=repository, env={"REWARD_CHECKPOINT": str(args.checkpoint)})
    try:

        def record(system: str, workload: str, ids: list[np.ndarray], run: Callable[[], object], one_call: bool = False) -> None:
            """`run` returns per-conversation latencies, unless `one_call` (then every latency is the call's)."""
            run()  # warm-up on the same work
            seconds, latencies = timed(run)
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
                    model_flops(systems.hf.config, lengths),
                )
            )
            print(f"  {system:<28} {workload:<10} {sum(lengths) / seconds:>10.0f} tokens/s", flush=True)

        for name in [w for w in ("long", "short") if w in chosen]:
            convs = workloads[name]
            ids = systems.ids(convs)
            record("a transformers 1-by-1", name, ids, lambda ids=ids: systems.one_at_a_time(ids))
            record("b transformers padded x8", name, ids, lambda ids=ids: systems.padded_batches(ids))
            record("c engine in-process", name, ids, lambda ids=ids: systems.engine_in_process(ids))
            if server is not None:
                record("d server gRPC c=16", name, ids, lambda convs=convs: through_server(server.grpc_url, convs))
                record("d server HTTP c=16", name, ids, lambda convs=convs: through_server(server.http_url, convs))
        if "best-of-8" in chosen:
            ids = systems.ids(best_of)
            record("a transformers 1-by-1", "best-of-8", ids, lambda: systems.one_at_a_time(ids))
            record("c engine, 8 separately", "best-of-8", ids, lambda: systems.engine_in_process(ids, concurrency=1))
            record("c engine, prefix reuse", "best-of-8", ids, lambda: systems.engine.score(ids), one_call=True)
            if server is not None:
                with RewardClient(server.grpc_url) as client:
                    record("d server score_responses", "best-of-8", ids, lambda: client.score_responses(prompt, responses), one_call=True)
    finally:
        if server is not None:
            stop_server(server)
        shutil.rmtree(workdir, ignore_errors=True)

    baseline = {r.workload: r for r in results if r.system.startswith("a ")}
    for r in results:
        r.tokens_per_s = r.tokens / r.seconds
        r.conversations_per_s = r.conversations / r.seconds
        r.ratio_to_a = baseline[r.workload].seconds / r.seconds
        # FLOPs are those of scoring every conversation in full; with prefix reuse less is computed.
        r.mfu = r.flops / r.seconds / peak[args.dtype]
    print_table(results)
    report = {
        "machine": {"platform": platform.platform(), "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__},
        "matmul_peak_flops": peak,
        "checkpoint": str(args.checkpoint),
        "results": [asdict(r) for r in results],
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


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
