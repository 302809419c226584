"""RMSNorm as one call of `torch.nn.functional.rms_norm` instead of transformers' seven operations.

transformers' Llama, Mistral and Qwen2 RMSNorm casts to fp32, squares, averages, adds epsilon, takes the
reciprocal square root, multiplies, casts back and multiplies by the weight: on a GPU seven or eight kernels
launched from Python, twice per decoder layer, where torch (2.8 and later) has one fused CUDA kernel
(`aten::_fused_rms_norm`). Launches are what bound a small step's time on a GPU (README, Benchmark). On a
CPU torch computes the same operations as transformers (the composite kernel): fp32 scores are the same
bits as transformers' (tested); bf16 ones are rounded once instead of twice.

The arithmetic is per token row, as transformers' is: batch invariance is unchanged. Gemma 2's norm
(scaled by 1 + weight, in fp32, then cast) takes its own form; other norms are left as they are
(Nemotron's is a LayerNorm, one kernel already).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reward_server.module_swap import replace_modules

WEIGHT_AFTER_CAST = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}  # weight * normalized.to(dtype)
ONE_PLUS_WEIGHT_IN_FP32 = {"Gemma2RMSNorm"}  # (normalized * (1 + weight)) in fp32, then cast


class FusedRMSNorm(nn.Module):
    """One `F.rms_norm` call. `in_fp32`: the input is normalised and scaled in fp32 and the result cast
    back (Gemma 2, whose `weight` here is its 1 + weight in fp32)."""

    def __init__(self, weight: torch.Tensor, eps: float, in_fp32: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps, self.in_fp32 = eps, in_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_fp32:
            return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps).type_as(x)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def fuse_rms_norms(trunk: nn.Module) -> nn.Module:
    """Swap every RMSNorm of `trunk` whose class is named above for a FusedRMSNorm of the same arithmetic."""
    return replace_modules(trunk, _fused)


def _fused(module: nn.Module) -> FusedRMSNorm | None:
    kind = type(module).__name__
    if kind in WEIGHT_AFTER_CAST:
        return FusedRMSNorm(module.weight.detach(), module.variance_epsilon, in_fp32=False)
    if kind in ONE_PLUS_WEIGHT_IN_FP32:
        return FusedRMSNorm(1.0 + module.weight.detach().float(), module.eps, in_fp32=True)
    return None
