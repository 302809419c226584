"""A pure-torch reader of TensorRT-LLM Llama checkpoints, to check build/trtllm_checkpoint.py on a CPU.

It reassembles the tensor-parallel shards and runs the Llama forward directly on TensorRT-LLM's
weight names and layer semantics (fused per-rank q/k/v, GatedMLP `proj(silu(fc(x)) * gate(x))`,
rope_gpt_neox with llama3 scaling), written here from those definitions rather than by mapping
back to transformers, so that a conversion which misnames a tensor cannot pass by inverting
itself. The reward is the logits of rows 0..N-1 at the last token, plus reward_head.json's bias.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


class TrtllmCheckpoint:
    def __init__(self, folder: Path) -> None:
        self.config = json.loads((folder / "config.json").read_text())
        head = json.loads((folder / "reward_head.json").read_text())
        self.names = head["attributes"]
        self.bias = torch.tensor(head.get("bias", [0.0] * len(self.names)))
        tp = self.config["mapping"]["tp_size"]
        self.shards = [load_file(folder / f"rank{r}.safetensors") for r in range(tp)]
        self.tp = tp

    def full(self, name: str) -> torch.Tensor:
        """One tensor reassembled from its shards (float32)."""
        parts = [shard[name].float() for shard in self.shards]
        if name.endswith(("vocab_embedding.weight", "layernorm.weight", "ln_f.weight")):
            assert all(torch.equal(parts[0], p) for p in parts), f"{name} differs across ranks"
            return parts[0]
        if name.endswith(("dense.weight", "proj.weight")):
            return torch.cat(parts, dim=1)
        if name == "lm_head.weight":
            return torch.cat(parts)[: self.config["vocab_size"]]
        return torch.cat(parts)

    def qkv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c, tp = self.config, self.tp
        d, heads, kv_heads = c["head_size"], c["num_attention_heads"], c["num_key_value_heads"]
        q_rows, kv_rows = heads // tp * d, max(kv_heads // tp, 1) * d
        parts = [s[f"transformer.layers.{layer}.attention.qkv.weight"].float() for s in self.shards]
        q = torch.cat([p[:q_rows] for p in parts])
        k = torch.cat([p[q_rows : q_rows + kv_rows] for p in parts])
        v = torch.cat([p[q_rows + kv_rows :] for p in parts])
        if kv_heads < tp:  # every rank held a repeated copy of its key/value head: keep one of each
            keep = list(range(0, tp, tp // kv_heads))
            k = torch.cat([k[r * d : (r + 1) * d] for r in keep])
            v = torch.cat([v[r * d : (r + 1) * d] for r in keep])
        return q, k, v

    @torch.inference_mode()
    def rewards(self, ids: np.ndarray) -> np.ndarray:
        """[N] reward-head outputs at the last token of one sequence."""
        c = self.config
        d, heads, kv_heads, eps = c["head_size"], c["num_attention_heads"], c["num_key_value_heads"], c["norm_epsilon"]
        n = len(ids)
        x = self.full("transformer.vocab_embedding.weight")[torch.from_numpy(np.asarray(ids, dtype=np.int64))]
        cos, sin = rope(c, n)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for layer in range(c["num_hidden_layers"]):
            name = f"transformer.layers.{layer}."
            h = rms_norm(x, self.full(name + "input_layernorm.weight"), eps)
            wq, wk, wv = self.qkv(layer)
            q = rotate((h @ wq.T).view(n, heads, d), cos, sin)
            k = rotate((h @ wk.T).view(n, kv_heads, d), cos, sin).repeat_interleave(heads // kv_heads, dim=1)
            v = (h @ wv.T).view(n, kv_heads, d).repeat_interleave(heads // kv_heads, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
            attention = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            x = x + torch.einsum("hqk,khd->qhd", attention, v).reshape(n, heads * d) @ self.full(name + "attention.dense.weight").T
            h = rms_norm(x, self.full(name + "post_layernorm.weight"), eps)
            gated = torch.nn.functional.silu(h @ self.full(name + "mlp.fc.weight").T) * (h @ self.full(name + "mlp.gate.weight").T)
            x = x + gated @ self.full(name + "mlp.proj.weight").T
        last = rms_norm(x[-1], self.full("transformer.ln_f.weight"), eps)
        return (last @ self.full("lm_head.weight")[: len(self.names)].T + self.bias).numpy()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(config: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n, head_size] of rope_gpt_neox, with Llama 3's frequency scaling when configured."""
    d = config["head_size"]
    inv_freq = 1.0 / (config["rotary_base"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.get("rotary_scaling") or {}
    if scaling.get("type") == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        smooth = (context / wavelength - low) / (high - low)
        scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        inv_freq = torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, heads, d]: the rotary embedding, halves rotated (GPT-NeoX style)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]
