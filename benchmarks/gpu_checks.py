"""On one GPU, what a CPU cannot check, in about a minute: one JSON of facts, printed as they come.

    python -m benchmarks.gpu_checks --checkpoint /tmp/rm-8b --out checks.json     (benchmarks/gpu_bench.sh builds it)

1. Batch invariance over the long mix's 64 conversations, each alone and inside one batch, bit for bit:
   which conversations differ with the defaults (`attention: auto`, varlen on a GPU), with every layer on
   `bmm` tiles, with every layer one call per tile, with `attention: loop`, and with the loop and cuDNN's
   SDPA allowed (as before dc3c0ee), so that one run tells what breaks it.
2. The products the load's probes chose per layer shape (invariance.settle_products), and the engine fed
   16 conversations a call (the bench's (c), long mix) with them and with every layer on `bmm` tiles,
   interleaved.
3. The prefix cache: 8 responses to one 2,000-token prompt sent one after another (each continuing the
   cached prompt) against each scored alone by the same engine with an empty cache, bit for bit; and each
   later request's time against the first's; with the defaults (the cache keeps the loop's tiles) and with
   `attention: varlen`.
4. The matrix products alone: whether one cuBLAS bf16 product and one FP8 `torch._scaled_mm` (row-wise
   scales) over M rows give each 256-row tile the bits of that tile's own call, for M from 1 to 16,384,
   and their speed against the tiles and the FP8 quantisation's.
5. `cuda_graphs`: the long mix scored in one batch and each of 16 conversations alone, and the short mix 16
   a call, by the engine with graphs against the same engine without, bit for bit; the shapes captured, the
   load's cost, and the short mix's calls both ways (interleaved, best of 2).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend
from transformers import AutoTokenizer

from benchmarks.benchmark import WorkloadMaker
from reward_server.fp8 import quantize_rows
from reward_server.invariance import tiled_matmul
from reward_server.prefix_cache import BLOCK_TOKENS, PrefixCache
from reward_server.runtimes import torch_runtime
from reward_server.runtimes.torch_runtime import TorchRewardEngine

DEVICE = "cuda"
SHAPES = {  # (in, out); q/k/v and gate/up are stacked into one product each (fused.py)
    "8B qkv": (4096, 6144),
    "8B gate/up": (4096, 28672),
    "8B down": (14336, 4096),
    "70B qkv": (8192, 10240),
    "70B gate/up": (8192, 57344),
    "70B down": (28672, 8192),
}
ROWS = [1, 64, 200, 256, 512, 768, 1024, 2048, 2304, 4096, 8192, 12288, 16384]


def clock(run, repeats: int = 3) -> float:
    """Seconds of one run, the best of `repeats` after a warm-up."""
    run()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def differing(engine: TorchRewardEngine, ids: list[np.ndarray]) -> list[int]:
    """Indices of the conversations whose score alone is not, bit for bit, their score inside one batch."""
    batch = engine.score(ids)[:, 0]
    return [i for i, s in enumerate(ids) if engine.score([s])[0, 0] != batch[i]]


def engines_agree(checkpoint: str, ids: list[np.ndarray], report: dict) -> None:
    """Batch invariance over the whole mix, by configuration: what breaks it, if anything does."""
    engine = TorchRewardEngine(checkpoint, device=DEVICE, dtype="bf16", max_step_tokens=16384)
    report["product_choices"] = {str(key[:2]): verdict for key, verdict in engine.products.items()}
    report["alone_differs_from_batch"] = found = {"default": differing(engine, ids)}
    layers = [m for m in engine.trunk.modules() if hasattr(m, "one_call_rows")]
    settled = {m: (m.one_call_rows, m.batched) for m in layers}
    for ways, label in (((0, True), "every layer on bmm tiles (before 8a69317)"), ((0, False), "every layer one call per tile")):
        for module in layers:
            module.one_call_rows, module.batched = ways
        found[label] = differing(engine, ids)
    for module, (count, batched) in settled.items():
        module.one_call_rows, module.batched = count, batched
    report["default_attention"] = "varlen" if engine.varlen else "loop"
    loop = TorchRewardEngine(checkpoint, device=DEVICE, dtype="bf16", max_step_tokens=16384, attention="loop")
    found["attention loop"] = differing(loop, ids)
    backends = torch_runtime.SDPA_BACKENDS
    torch_runtime.SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *backends]  # what SDPA chose before dc3c0ee
    found["attention loop, cuDNN allowed"] = differing(loop, ids)
    torch_runtime.SDPA_BACKENDS = backends
    report["default_vs_loop_max_abs"] = float(np.abs(loop.score(ids)[:, 0] - engine.score(ids)[:, 0]).max())
    print({k: report[k] for k in report if k.startswith(("product", "alone", "default"))}, flush=True)
    del loop
    torch.cuda.empty_cache()
    report["engine_c_long_tokens_per_s"] = one_call_against_tiles(checkpoint, ids, engine)


def one_call_against_tiles(checkpoint: str, ids: list[np.ndarray], engine: TorchRewardEngine) -> dict:
    """tokens/s of the engine fed 16 conversations a call, with the probe's one-call layers and with every
    layer on tiles, interleaved (best of 2)."""
    tiles = TorchRewardEngine(checkpoint, device=DEVICE, dtype="bf16", max_step_tokens=16384)
    for module in tiles.trunk.modules():
        if hasattr(module, "one_call_rows"):
            module.one_call_rows, module.batched = 0, True
    engines = {"as the probes chose": engine, "bmm tiles everywhere": tiles}
    for each in engines.values():  # warm-up
        each.score(ids[:16])
    rates = interleaved_rates(engines, [ids[i : i + 16] for i in range(0, len(ids), 16)])
    print(f"engine fed 16 a call, long mix: {rates}", flush=True)
    del engines, tiles
    torch.cuda.empty_cache()
    return rates


def interleaved_rates(engines: dict[str, TorchRewardEngine], calls: list[list[np.ndarray]]) -> dict[str, float]:
    """tokens/s of each engine scoring `calls` (one score call each), the engines' runs interleaved, best of 2."""
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(2):
        for label, engine in engines.items():
            sync()
            start = time.perf_counter()
            for call in calls:
                engine.score(call)
            sync()
            best[label] = min(best[label], time.perf_counter() - start)
    tokens = sum(len(s) for call in calls for s in call)
    return {label: tokens / seconds for label, seconds in best.items()}


def cache_is_exact(checkpoint: str, maker: WorkloadMaker, report: dict, attention: str = "auto") -> None:
    prompt, responses = maker.best_of(8, 2000, 100, 300)
    conversations = [[*prompt, {"role": "assistant", "content": r}] for r in responses]
    ids = [np.array(maker.tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in conversations]
    options = dict(device=DEVICE, dtype="bf16", max_step_tokens=16384, prefix_cache_tokens=65536, attention=attention)
    cached = TorchRewardEngine(checkpoint, **options)
    per_token = cached.prefix_cache.max_bytes // (cached.prefix_cache.capacity * BLOCK_TOKENS)
    empty = lambda: PrefixCache(65536, per_token)  # noqa: E731
    alone = []
    for s in ids:
        cached.prefix_cache = empty()
        alone.append(cached.score([s])[0, 0])
    cached.prefix_cache = empty()
    seconds, scores = [], []
    for s in ids:
        sync()
        start = time.perf_counter()
        scores.append(cached.score([s])[0, 0])
        seconds.append(time.perf_counter() - start)
    report[f"cache_{attention}"] = found = {
        "one_by_one_equals_alone": bool(np.array_equal(np.array(scores), np.array(alone))),
        "hits": cached.prefix_cache.counters.hits,
        "first_request_s": seconds[0],
        "later_over_first": float(np.mean(seconds[1:]) / seconds[0]),
    }
    print(f"cache, attention {attention}: {found}", flush=True)
    del cached
    torch.cuda.empty_cache()


def graphs_agree(checkpoint: str, ids: list[np.ndarray], short: list[np.ndarray], report: dict) -> None:
    options = dict(device=DEVICE, dtype="bf16", max_step_tokens=16384)
    plain = TorchRewardEngine(checkpoint, **options)
    started = time.perf_counter()
    graphed = TorchRewardEngine(checkpoint, **options, cuda_graphs=True)
    found = report["graphs"] = {"load_s_with_graphs": time.perf_counter() - started}
    batch = plain.score(ids)
    found["long_batch_equal"] = bool(np.array_equal(graphed.score(ids), batch))
    found["long_alone_equal"] = bool(all(np.array_equal(graphed.score([s])[0], batch[i]) for i, s in enumerate(ids[:16])))
    calls = [short[i : i + 16] for i in range(0, len(short), 16)]
    found["short_equal"] = bool(all(np.array_equal(graphed.score(c), plain.score(c)) for c in calls))  # also the warm-up
    found["short_tokens_per_s"] = interleaved_rates({"without": plain, "with": graphed}, calls)
    found["shapes_captured"] = len(graphed.graphs.graphs)
    found["steps_replayed"] = graphed.graphs.replays  # none would mean the checks above compared Python with Python
    print(f"cuda graphs: {found}", flush=True)
    del plain, graphed
    torch.cuda.empty_cache()


def products(report: dict) -> None:
    """Row-count invariance and speed of one bf16 mm and one FP8 _scaled_mm over up to 16,384 rows."""
    torch.manual_seed(0)
    report["products_16384_rows"] = out = {}
    for name, (k, n) in SHAPES.items():
        out[name] = product_row(k, n)
        print(f"{name}: {out[name]}", flush=True)


def product_row(k: int, n: int) -> dict:
    rows = max(ROWS)
    x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * k**-0.5
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    ws = ws.T.contiguous()
    calls = {
        "bf16": lambda first, last: x[first:last] @ w.T,
        "fp8": lambda first, last: torch._scaled_mm(xq[first:last], wq.T, scale_a=xs[first:last], scale_b=ws, out_dtype=torch.bfloat16),
    }
    row = {}
    for kind, call in calls.items():
        tiles = [call(i, i + 256) for i in range(0, rows, 256)]
        differ = []
        for m in ROWS:
            try:
                whole = call(0, m)
            except RuntimeError as exc:  # a row count the kernel refuses
                differ.append(f"{m}: {exc}"[:200])
                continue
            if not all(torch.equal(whole[i : i + 256], tiles[i // 256][: min(256, m - i)]) for i in range(0, m, 256)):
                differ.append(m)
        row[f"{kind}_rows_differ_at"] = differ
        row[f"{kind}_one_call_ms"] = 1e3 * clock(lambda call=call: call(0, rows))
        row[f"{kind}_tile_calls_ms"] = 1e3 * clock(lambda call=call: [call(i, i + 256) for i in range(0, rows, 256)])
    row["bf16_tiled_bmm_ms"] = 1e3 * clock(lambda: tiled_matmul(x, w, 256))
    row["fp8_quantize_ms"] = 1e3 * clock(lambda: quantize_rows(x))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/rm-8b")
    parser.add_argument("--out", default="gpu-checks.json")
    parser.add_argument("--cpu-dry-run", action="store_true", help="on the CPU with small shapes: checks this script only")
    parser.add_argument("--only", default="invariance,cache,products,graphs", help="comma-separated subset of the checks")
    args = parser.parse_args()
    if args.cpu_dry_run:
        global DEVICE
        DEVICE = "cpu"
        SHAPES.clear()
        SHAPES["tiny"] = (64, 96)
        ROWS[:] = [1, 200, 256, 512, 1024]
    report = {"device": torch.cuda.get_device_properties(0).name if DEVICE == "cuda" else "cpu (dry run)", "torch": torch.__version__}
    started = time.perf_counter()
    maker = WorkloadMaker(AutoTokenizer.from_pretrained(args.checkpoint), seed=2024)
    count, longest = (8, 300) if args.cpu_dry_run else (64, 3000)
    ids = [np.array(maker.tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in maker.mix(count, 100, longest)]

    def caches() -> None:
        for attention in ("auto", "varlen") if DEVICE == "cuda" else ("auto",):  # varlen runs on a GPU only
            cache_is_exact(args.checkpoint, maker, report, attention)

    short = [np.array(maker.tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in maker.mix(64, 30, 300)]
    checks = {
        "invariance": lambda: engines_agree(args.checkpoint, ids, report),
        "cache": caches,
        "products": lambda: products(report),
        "graphs": (lambda: graphs_agree(args.checkpoint, ids, short, report)) if DEVICE == "cuda" else lambda: None,  # CUDA only
    }
    for check in (checks[name] for name in args.only.split(",")):
        try:
            check()
        except Exception as exc:  # one failing check must not cost the others' device minutes
            report.setdefault("errors", []).append(repr(exc))
            print(f"check failed: {exc!r}", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    report["wall_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
