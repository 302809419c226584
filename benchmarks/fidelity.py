"""Precision fidelity: bf16 and FP8 scores against the fp32 reference, on one checkpoint.

For each dtype: max and mean |score - fp32 score| over a set of conversations, and the agreement
of pairwise preferences (sign of r_a - r_b equal to fp32's) over random pairs of them. On a CPU, FP8
is the exact emulation of the tensor cores' arithmetic (reward_server/fp8.py), so its numbers stand for
a GPU's up to the order of the fp32 sums. Random-weight checkpoints make this a proxy for real ones.

    python -m benchmarks.fidelity --checkpoint .build/demo-checkpoint --pairs 1000
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from transformers import AutoTokenizer

from reward_server.runtimes.torch_runtime import TorchRewardEngine
from tests.corpus import conversations


def token_sets(checkpoint: str, count: int, seed: int, longest: int) -> list[np.ndarray]:
    """The parity corpus, templated, and random token sequences of 20-`longest` tokens up to `count`."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    sets = [np.array(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in conversations()]
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    sets += [rng.integers(0, vocab, int(n)) for n in rng.integers(20, longest, max(count - len(sets), 0))]
    return sets


def fidelity(reference: np.ndarray, scores: np.ndarray, pairs: np.ndarray) -> dict[str, float]:
    delta = np.abs(scores - reference)
    a, b = pairs.T
    agree = np.sign(scores[a] - scores[b]) == np.sign(reference[a] - reference[b])
    return {"max_abs": float(delta.max()), "mean_abs": float(delta.mean()), "pair_agreement": float(agree.mean())}


def runs(dtypes: list[str], fp8_bf16_layers: list[int]) -> list[tuple[str, str, int]]:
    """(label, dtype, first decoder layers kept in bf16) of each engine to score with: fp32 (the reference)
    first, then each dtype, fp8 once per count of bf16 layers ("fp8+4bf16")."""
    chosen = [("fp32", "fp32", 0)]
    for dtype in dtypes:
        chosen += [(dtype if n == 0 else f"{dtype}+{n}bf16", dtype, n) for n in (fp8_bf16_layers if dtype == "fp8" else [0])]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=".build/demo-checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--longest", type=int, default=1000, help="longest random token sequence added to the corpus")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--dtypes", default="bf16,fp8")
    parser.add_argument("--fp8-bf16-layers", default="0", help="fp8 rows with these numbers of first decoder layers in bf16 (e.g. 0,4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    sets = token_sets(args.checkpoint, args.conversations, args.seed, args.longest)
    rng = np.random.default_rng(args.seed + 1)
    pairs = rng.integers(0, len(sets), (args.pairs * 2, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]][: args.pairs]
    scores = {}
    for label, dtype, kept in runs(args.dtypes.split(","), [int(n) for n in args.fp8_bf16_layers.split(",")]):
        engine = TorchRewardEngine(args.checkpoint, device=args.device, dtype=dtype, fp8_bf16_layers=kept)
        scores[label] = engine.score(sets)[:, 0].astype(np.float64)
        print(f"{label} scored", flush=True)
    spread = float(np.std(scores["fp32"]))
    results = {dtype: fidelity(scores["fp32"], scores[dtype], pairs) for dtype in scores if dtype != "fp32"}
    print(f"{args.checkpoint} on {args.device}: {len(sets)} conversations, {len(pairs)} pairs, fp32 score std {spread:.4f}")
    print(f"{'dtype':10} {'max |Δ|':>10} {'mean |Δ|':>10} {'pair agreement':>15}")
    for dtype, r in results.items():
        print(f"{dtype:10} {r['max_abs']:10.4f} {r['mean_abs']:10.4f} {r['pair_agreement']:15.1%}")
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"checkpoint": args.checkpoint, "device": args.device, "fp32_std": spread, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
