"""One GPU, no network, under 5 minutes: bf16 against FP8 on a 70B-wide model, and FP8 fidelity on the 8B shape.

    python -m benchmarks.gpu_fp8_tp --out gpu-fp8.json      (from the repository root; ~2-4 min on an H100)

1. Speed and memory: a Llama-3.1-70B-wide trunk (hidden 8192, 64 heads, 8 KV heads, MLP 28672) with
   --layers of its 80 layers, random weights built on the GPU, run by the project's engine (fixed --tiles
   row tiles, each layer's products made as the load's probes chose, invariance.py; packed steps of
   --step-tokens tokens) in bf16 and in FP8 (torch._scaled_mm, row-wise scales).
   Reported per layer: time of one step, weight bytes, activation peak; and the implied tokens/s of the
   80-layer model (step tokens / (80 x per-layer time); the embedding lookup, final norm and head are
   left out, being < 0.1 % of a layer).
2. Fidelity: the 8B shape (hidden 4096, 32 heads, 8 KV heads, MLP 14336, 32 layers; random weights,
   seeded, built on the GPU): fp32 reference, bf16 and FP8 scores of --conversations random token
   sequences of 100-3,000 tokens: max and mean |Δ| and the pairwise preference agreement over --pairs
   random pairs; and whether one sequence scored alone and inside a mixed batch gives one value
   (FP8 batch invariance on the real kernels).

Random weights make the fidelity a proxy for a real checkpoint. The checkpoint loader is replaced by a
builder of random weights (no files: a 70B-wide layer is 1.7 GB); everything after loading is the
engine's own code. Not run on this project's CPU machines (no GPU); see README, "FP8, tensor parallelism
and memory".
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, LlamaConfig

from benchmarks.fidelity import fidelity, runs
from reward_server.head_spec import read_head_spec
from reward_server.heads import RewardHead
from reward_server.memory import module_bytes
from reward_server.runtimes import torch_runtime
from reward_server.runtimes.torch_runtime import TorchRewardEngine

VOCAB = 4096  # the vocabulary does not change a layer's cost; a small one saves memory
DEVICE = "cuda"
WIDE = dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672)
SHAPE_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, num_hidden_layers=32)


def random_loader(shape: dict, seed: int):
    """A stand-in for heads.load_reward_model: a Llama trunk and a 1-row head, random, seeded, on the GPU."""

    def load(checkpoint, dtype, attn_implementation, shard=None):
        if shard is not None:
            raise ValueError("random weights: one device only")
        config = LlamaConfig(vocab_size=VOCAB, initializer_range=0.02, rope_theta=500000.0, **shape)
        config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        with torch.device(DEVICE):  # built in fp32 and cast: every dtype starts from the same weights
            trunk = AutoModel.from_config(config, dtype=torch.float32).to(dtype).eval()
            weight = (torch.randn(1, config.hidden_size) * 0.02).to(dtype)
        spec = read_head_spec(Path(tempfile.mkdtemp()), ["reward"])
        return trunk, RewardHead(weight=weight, bias=None, spec=spec)

    return load


CHECKPOINT_LOADER = torch_runtime.load_reward_model


def engine(shape: dict, dtype: str, seed: int = 0, checkpoint: str | None = None, **options) -> TorchRewardEngine:
    """The engine on random weights of `shape`, or on `checkpoint` (loaded as the server loads it)."""
    torch_runtime.load_reward_model = CHECKPOINT_LOADER if checkpoint else random_loader(shape, seed)
    return TorchRewardEngine(checkpoint or "random", device=DEVICE, dtype=dtype, min_shared_prefix=0, **options)


def speed(layers: int, step_tokens: int, repeats: int, tiles: list[int]) -> dict:
    """Per dtype and linear-layer tile size (invariance.py): a step's time per layer, and whether one
    sequence scored alone and inside the step gives one value."""
    rng = np.random.default_rng(0)
    length = min(2048, step_tokens)
    sequences = [rng.integers(0, VOCAB, length) for _ in range(step_tokens // length)]
    probe = sequences[0][:700]
    gpu = DEVICE == "cuda"
    results = {}
    for dtype in ("bf16", "fp8"):
        for tile in tiles:
            torch.cuda.empty_cache()
            model = engine({**WIDE, "num_hidden_layers": layers}, dtype, max_step_tokens=step_tokens, max_tokens=length, tile_rows=tile)
            layer_bytes = module_bytes(model.trunk.layers[0])
            model.score_step(sequences)  # warm-up: kernels chosen, allocator filled
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated() if gpu else 0
            start = time.perf_counter()
            for _ in range(repeats):
                model.score_step(sequences)
            if gpu:
                torch.cuda.synchronize()
            step_s = (time.perf_counter() - start) / repeats
            per_layer = step_s / layers
            alone = model.score([probe])[0, 0]
            packed = model.score([sequences[1], probe, sequences[2][:1500]])[1, 0]
            results[f"{dtype} tile {tile}"] = row = {
                "per_layer_ms": per_layer * 1e3,
                "layer_weight_GiB": layer_bytes / 2**30,
                "activation_peak_GiB": (torch.cuda.max_memory_allocated() - resident) / 2**30 if gpu else None,
                "weights_80_layers_GiB": 80 * layer_bytes / 2**30,
                "tokens_per_s_80_layers": step_tokens / (80 * per_layer),
                "alone_equals_packed": bool(alone == packed),
                "products": sorted(model.products.values()),
            }
            print(f"70B-wide {dtype} tile {tile}: {row}", flush=True)
            del model
    return results


def fidelity_8b(count: int, pairs: int, longest: int = 3000, checkpoint: str | None = None, bf16_layers: int = 4) -> dict:
    rng = np.random.default_rng(1)
    sets = [rng.integers(0, VOCAB, int(n)) for n in rng.integers(100, longest, count)]
    chosen = rng.integers(0, count, (pairs * 2, 2))
    chosen = chosen[chosen[:, 0] != chosen[:, 1]][:pairs]
    scores, invariant = {}, {}
    for label, dtype, kept in runs(["bf16", "fp8"], sorted({0, bf16_layers})):
        torch.cuda.empty_cache()
        model = engine(SHAPE_8B, dtype, seed=1, checkpoint=checkpoint, max_tokens=longest, fp8_bf16_layers=kept)
        scores[label] = model.score(sets)[:, 0].astype(np.float64)
        alone = model.score([sets[5]])[0, 0]
        invariant[label] = bool(alone == scores[label][5] == model.score([sets[7], sets[5], sets[1]])[1, 0])
        print(f"8B shape {label}: scored; alone == in batch: {invariant[label]}", flush=True)
        del model
    results = {d: {**fidelity(scores["fp32"], scores[d], chosen), "batch_invariant": invariant[d]} for d in scores if d != "fp32"}
    results["fp32_std"] = float(np.std(scores["fp32"]))
    results["fp32_batch_invariant"] = invariant["fp32"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="70B-wide layers built (of 80)")
    parser.add_argument("--step-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiles", default="64,256,512", help="linear-layer tile sizes to time (rows)")
    parser.add_argument("--conversations", type=int, default=48)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--fp8-bf16-layers", type=int, default=4, help="also an fp8 row with this many first layers in bf16 (0: none)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--checkpoint", help="fidelity on this checkpoint (demo_checkpoint.py --preset llama8b), not random weights")
    parser.add_argument("--out", default="gpu-fp8.json")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU (FP8 emulated): checks this script only")
    args = parser.parse_args()
    if args.cpu_dry_run:
        global DEVICE
        DEVICE = "cpu"
        WIDE.update(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, intermediate_size=512)
        SHAPE_8B.update(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, num_hidden_layers=2)
        args.fp8_bf16_layers = min(args.fp8_bf16_layers, 1)
        report = {"device": "cpu (dry run)", "torch": torch.__version__}
    else:
        report = {
            "device": torch.cuda.get_device_properties(0).name,
            "capability": list(torch.cuda.get_device_capability(0)),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
    print(report, flush=True)
    started = time.perf_counter()
    if not args.skip_speed:
        report["speed_70b_wide"] = speed(args.layers, args.step_tokens, args.repeats, [int(t) for t in args.tiles.split(",")])
    if not args.skip_fidelity:
        longest = 300 if args.cpu_dry_run else 3000
        report["fidelity_8b_shape"] = fidelity_8b(args.conversations, args.pairs, longest, args.checkpoint, args.fp8_bf16_layers)
        report["fidelity_checkpoint"] = args.checkpoint or "random weights (seeded)"
    report["wall_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
