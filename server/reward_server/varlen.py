"""`attention: varlen`: one attention call per layer over a step's packed sequences, FlashAttention-2's
variable-length kernel, instead of one SDPA call per sequence and layer (512 calls for a step of 16
conversations on a 32-layer model, each with its slices, and on Hopper a cuDNN execution plan built for
every sequence length not seen before). It takes the packed row as it is, with the sequences' bounds.

The default where it runs (`attention: auto`), unless the prefix cache is on, for what one H200 measured
(torch 2.11, benchmarks/gpu_checks.py and gpu_bench.sh, 2026-11-27):
- batch invariance: each of 64 conversations scored alone and inside one batch gave one value. In
  FlashAttention-2's source the kernel is chosen by head size, causality and the device, not by the batch,
  which sizes only its grid.
  The decoding path that splits the keys (one query a sequence) is kept off by `max_q` >= 2, and where the
  op takes `num_splits` (torch >= 2.13) it is given 1 as well;
- with the prefix cache, 8 responses to one prompt sent one after another gave the bits each gave alone
  (one check; the loop's tiles make it so by construction, so `auto` keeps the loop there);
- speed: no gain in a long step (attention ~10 % of its GPU time; 32,870 against 32,740 tokens/s), but
  fewer calls from Python where steps are small: the server's short-mix steps took 49.7 ms against
  56.6 (two runs of the same day).

Within a segment the kernel computes what the per-sequence path computes: each segment's queries are its
last tokens, bottom-right aligned on its keys (a continued prefix's first). Its single-query path (every
sequence one query long, grouped-query heads) would be chosen by the batch: `max_q` is given as at least 2,
which only sizes the grid. It runs on CUDA devices with FlashAttention (sm80 and later) in bf16/fp16, head
sizes that are multiples of 8 up to 256, and layers without a sliding window or soft-capping (torch's
FlashAttention-2 cannot soft-cap, and it drops a window longer than the batch's longest sequence, a choice
made by the batch); other layers keep the per-sequence path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLASH = torch.ops.aten._flash_attention_forward.default
SPLITS = {"num_splits": 1} if any(a.name == "num_splits" for a in FLASH._schema.arguments) else {}  # torch >= 2.13


@dataclass
class VarlenBatch:
    """The packed sequences' bounds as the kernel takes them (on the device, made once per step)."""

    cu_q: torch.Tensor  # int32 [segments + 1]: where each segment's queries start in the packed row
    cu_k: torch.Tensor  # int32 [segments + 1]: the same for its keys (its prefix's first, then its own)
    max_q: int
    max_k: int

    @classmethod
    def of(cls, lengths: list[int], prefixes: list[int], device: torch.device) -> VarlenBatch:
        """Segments of `lengths` new tokens, each continuing `prefixes` earlier tokens (keys only)."""
        totals = [n + p for n, p in zip(lengths, prefixes, strict=True)]
        bounds = torch.tensor([[0, 0], *zip(lengths, totals, strict=True)], dtype=torch.int64).cumsum(0).to(torch.int32)
        bounds = bounds.to(device, non_blocking=True)
        return cls(bounds[:, 0].contiguous(), bounds[:, 1].contiguous(), max(2, *lengths), max(totals))


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the varlen kernel runs on `device` for activations of `dtype`."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def fits(head_dim: int, window: int | None, softcap: float | None) -> bool:
    """Whether a layer's attention is one the kernel computes as the model asks."""
    return head_dim % 8 == 0 and head_dim <= 256 and not window and not softcap


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: VarlenBatch, scale: float | None) -> torch.Tensor:
    """Causal attention of packed [tokens, heads, dim] queries over packed keys/values [tokens, kv_heads, dim]:
    each segment's queries are its last tokens (bottom-right aligned on its keys). Returns [tokens, heads, dim]."""
    out, *_ = FLASH(query, key, value, batch.cu_q, batch.cu_k, batch.max_q, batch.max_k, 0.0, True, False, scale=scale, **SPLITS)
    return out
