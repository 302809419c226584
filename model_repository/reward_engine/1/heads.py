"""Reward heads: which linear map turns the trunk's last hidden state into named scores.

A checkpoint is a transformers folder, optionally with a head description beside it:

    reward_head.json          {"attributes": ["helpfulness", ...], "reward": {"index": 0}}
                              or "reward": {"weights": [w_0, ..., w_N-1]} (the reward is their weighted sum)
    reward_head.safetensors   "weight" [N, hidden] and optionally "bias" [N]: a separate head

Which head is used:
- `*ForSequenceClassification`: its `score` layer (raw outputs, no activation) read where
  transformers reads it (the last token that is not `pad_token_id`); names from reward_head.json,
  else from `id2label` ("reward" for one unnamed output).
- a causal LM with reward_head.safetensors: that head on the trunk (NeMo-Aligner's `rm_head`).
- a causal LM without it: rows 0..N-1 of `lm_head` (the -HF convention, N = 1 unless
  reward_head.json names more), with the model's final logit soft-capping if it has one. Only
  those rows are kept: the full-vocabulary projection is never computed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

HEAD_SPEC = "reward_head.json"
HEAD_WEIGHTS = "reward_head.safetensors"


@dataclass
class RewardHead:
    """A linear map hidden -> N named outputs; `reward` picks or mixes them into the reward."""

    weight: torch.Tensor  # [N, hidden]
    bias: torch.Tensor | None  # [N]
    names: list[str]
    reward_weights: np.ndarray  # [N]: the reward is outputs @ reward_weights (one-hot for an index)
    softcap: float | None = None  # final logit soft-capping of the LM this head was cut from
    pad_token: int | None = None  # a classifier reads at the last token that is not this one

    def __post_init__(self) -> None:
        n = len(self.names)
        if self.weight.ndim != 2 or self.weight.shape[0] != n:
            raise ValueError(f"reward head: weight {tuple(self.weight.shape)} does not have {n} rows (one per attribute)")
        if self.bias is not None and tuple(self.bias.shape) != (n,):
            raise ValueError(f"reward head: bias {tuple(self.bias.shape)} is not [{n}]")

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, hidden] -> [M, N] outputs, in fp32."""
        outputs = hidden.float() @ self.weight.float().T
        if self.softcap:
            outputs = torch.tanh(outputs / self.softcap) * self.softcap
        return outputs if self.bias is None else outputs + self.bias.float()

    def reward(self, outputs: np.ndarray) -> np.ndarray:
        """[..., N] outputs -> [...] rewards."""
        return outputs @ self.reward_weights


def load_reward_model(checkpoint: str, dtype: torch.dtype, attn_implementation: str) -> tuple[torch.nn.Module, RewardHead]:
    """The transformers trunk (no LM head) and the reward head of a checkpoint folder."""
    folder = Path(checkpoint)
    spec = _read_spec(folder)
    pad_token = None
    config = AutoConfig.from_pretrained(checkpoint)
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = auto.from_pretrained(checkpoint, dtype=dtype, attn_implementation=attn_implementation)
    if classifier:
        layer = model.score
        names = spec.get("attributes") or _label_names(config)
        weight, bias, softcap = layer.weight, layer.bias, None
        pad_token = config.get_text_config().pad_token_id
    elif (folder / HEAD_WEIGHTS).exists():
        tensors = load_file(folder / HEAD_WEIGHTS)
        if "weight" not in tensors:
            raise ValueError(f"{folder / HEAD_WEIGHTS}: no 'weight' tensor (expected weight [N, hidden] and optional bias [N])")
        weight, bias, softcap = tensors["weight"], tensors.get("bias"), None
        names = spec.get("attributes") or (["reward"] if weight.shape[0] == 1 else [f"output_{i}" for i in range(weight.shape[0])])
    else:  # -HF convention: the reward rows are the first rows of lm_head
        names = spec.get("attributes") or ["reward"]
        weight, bias = model.get_output_embeddings().weight[: len(names)], None
        softcap = getattr(config, "final_logit_softcapping", None)
    hidden_size = model.base_model.config.hidden_size
    if weight.ndim != 2 or weight.shape[1] != hidden_size:
        raise ValueError(f"{checkpoint}: reward head weight {tuple(weight.shape)} does not take the trunk's hidden size {hidden_size}")
    head = RewardHead(
        weight=weight.detach().clone(),
        bias=None if bias is None else bias.detach().clone(),
        names=list(names),
        reward_weights=_reward_weights(spec.get("reward", {}), names, folder),
        softcap=softcap,
        pad_token=pad_token,
    )
    trunk = model.base_model
    del model  # drops the full-vocabulary lm_head of a causal LM
    return trunk, head


def _read_spec(folder: Path) -> dict:
    path = folder / HEAD_SPEC
    if not path.exists():
        return {}
    spec = json.loads(path.read_text())
    unknown = set(spec) - {"attributes", "reward"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: attributes, reward")
    names = spec.get("attributes")
    if names is not None and (
        not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)
    ):
        raise ValueError(f"{path}: attributes must be a non-empty list of distinct, non-empty names")
    return spec


def _label_names(config) -> list[str]:
    labels = [config.id2label[i] for i in range(config.num_labels)]
    if all(re.fullmatch(r"LABEL_\d+", label) for label in labels):  # transformers' placeholders
        return ["reward"] if len(labels) == 1 else [f"output_{i}" for i in range(len(labels))]
    return labels


def _reward_weights(rule: dict, names: list[str], folder: Path) -> np.ndarray:
    """One-hot at `index` (default 0), or the given `weights`."""
    where = f"{folder / HEAD_SPEC}: reward"
    if not isinstance(rule, dict) or set(rule) - {"index", "weights"} or len(rule) > 1:
        raise ValueError(f"{where}: expected {{'index': i}} or {{'weights': [...]}}")
    if "weights" in rule:
        weights = rule["weights"]
        if not isinstance(weights, list) or len(weights) != len(names) or not all(_finite(w) for w in weights):
            raise ValueError(f"{where}.weights: expected {len(names)} finite numbers (one per attribute)")
        return np.array(weights, dtype=np.float32)
    index = rule.get("index", 0)
    if not isinstance(index, int) or not 0 <= index < len(names):
        raise ValueError(f"{where}.index: {index!r} is not an attribute index below {len(names)}")
    return np.eye(len(names), dtype=np.float32)[index]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
