"""The head description beside a checkpoint, read by both runtimes and by build/trtllm_checkpoint.py:

reward_head.json: the names of a reward head's N outputs, which one (or which mix) is the reward,
and an optional bias.

    {"attributes": ["helpfulness", ...], "reward": {"index": 0}}
    "reward": {"weights": [w_0, ..., w_N-1]} makes the reward their weighted sum;
    "bias": [b_0, ..., b_N-1] is added to the outputs (a head folded into a bias-free lm_head keeps its bias here)

reward_head.safetensors (optional): a separate head, "weight" [N, hidden] and optional "bias" [N].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

HEAD_SPEC = "reward_head.json"
HEAD_WEIGHTS = "reward_head.safetensors"  # a separate head: weight [N, hidden], optional bias [N]


@dataclass
class HeadSpec:
    """What reward_head.json says: the N output names, the reward rule, and an optional bias
    added after the linear map (for heads folded into a bias-free `lm_head`)."""

    names: list[str]
    reward_weights: np.ndarray  # [N]: the reward is outputs @ reward_weights (one-hot for an index)
    bias: np.ndarray | None = None  # [N]

    def reward(self, outputs: np.ndarray) -> np.ndarray:
        """[..., N] outputs -> [...] rewards."""
        return outputs @ self.reward_weights


def default_names(count: int) -> list[str]:
    """Names of outputs nobody named: "reward" for a single one, output_0 ... otherwise."""
    return ["reward"] if count == 1 else [f"output_{i}" for i in range(count)]


def read_separate_head(folder: Path) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """reward_head.safetensors' weight [N, hidden] and bias [N] (None without one), if the folder has it."""
    path = folder / HEAD_WEIGHTS
    if not path.exists():
        return None
    tensors = load_file(path)
    if "weight" not in tensors:
        raise ValueError(f"{path}: no 'weight' tensor (expected weight [N, hidden] and optional bias [N])")
    return tensors["weight"], tensors.get("bias")


def head_bias(folder: Path, spec: HeadSpec, own: torch.Tensor | None) -> torch.Tensor | None:
    """The bias added to the outputs: the head's own, or reward_head.json's; never both."""
    if own is not None and spec.bias is not None:
        raise ValueError(f"{folder / HEAD_SPEC}: bias given twice (the head has its own)")
    return own if spec.bias is None else torch.from_numpy(spec.bias)


def read_head_spec(folder: Path, default_names: list[str]) -> HeadSpec:
    """reward_head.json of a checkpoint (or engine) folder, validated; defaults where it is absent."""
    path = folder / HEAD_SPEC
    spec = json.loads(path.read_text()) if path.exists() else {}
    allowed = {"attributes", "reward", "bias"}
    if not isinstance(spec, dict) or set(spec) - allowed:
        raise ValueError(f"{path}: expected an object with keys from {sorted(allowed)}")
    names = spec.get("attributes", default_names)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{path}: attributes must be a non-empty list of distinct, non-empty names")
    bias = spec.get("bias")
    if bias is not None:
        bias = _numbers(bias, len(names), f"{path}: bias")
    return HeadSpec(names=names, reward_weights=_reward_weights(spec.get("reward", {}), names, path), bias=bias)


def _reward_weights(rule: dict, names: list[str], path: Path) -> np.ndarray:
    """One-hot at `index` (default 0), or the given `weights`."""
    where = f"{path}: reward"
    if not isinstance(rule, dict) or set(rule) - {"index", "weights"} or len(rule) > 1:
        raise ValueError(f"{where}: expected {{'index': i}} or {{'weights': [...]}}")
    if "weights" in rule:
        return _numbers(rule["weights"], len(names), f"{where}.weights")
    index = rule.get("index", 0)
    if not isinstance(index, int) or not 0 <= index < len(names):
        raise ValueError(f"{where}.index: {index!r} is not an attribute index below {len(names)}")
    return np.eye(len(names), dtype=np.float32)[index]


def _numbers(values, count: int, where: str) -> np.ndarray:
    if not isinstance(values, list) or len(values) != count or not all(_finite(v) for v in values):
        raise ValueError(f"{where}: expected {count} finite numbers (one per attribute)")
    return np.array(values, dtype=np.float32)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
