"""FP8 (`dtype: fp8`): trunk linear layers in float8 e4m3 with per-row scales, products on FP8 tensor cores.

The scheme (one per linear layer of the decoder layers; embeddings, norms, the final norm and the
reward head keep their bf16/fp32 weights, and so do the first `fp8_bf16_layers` decoder layers):
- weights: quantised once at load, one scale per output row, scale = amax(|row|) / 448 (e4m3's
  largest finite value), so each row uses e4m3's whole range;
- activations: quantised at every call, one scale per token row, the same rule. Per-row scales keep
  rows independent of the rows packed beside them: batch invariance holds bit for bit (a scale over
  the whole packed batch would let one long conversation change another's scores);
- product: sum over k of q_x[m, k] * q_w[n, k], accumulated in fp32, times scale_x[m] * scale_w[n],
  rounded once to the output dtype (bf16).

On a CUDA device with FP8 tensor cores (sm89+) the product is `torch._scaled_mm` with row-wise
scales. It runs as every linear layer does (invariance.py): one call over the step's rows where the load's
probe proved that call gives every tile the bits of its own call at every row count (on one H200 it did:
one call per layer instead of one per 256-row tile), else one call per fixed tile of `tile_rows` rows. Elsewhere
(a CPU) the same arithmetic is emulated: the e4m3 values are exact in fp32, and so are their
products, so only the order of the fp32 sums can differ from the tensor cores'. Emulation proves
numerics, not speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reward_server.invariance import TILE_ROWS, settled_product, tiled_matmul
from reward_server.module_swap import replace_modules

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_AMAX = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] -> (e4m3 values [rows, k], fp32 scales [rows, 1]) with x ≈ values * scales."""
    # One reduction pass for the row maxima and one fp32 division pass (x promoted as it is read): a GPU's
    # quantisation is memory-bound, and copies of x in fp32 (x.float(), abs) cost as much as the product.
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = amax.clamp(min=MIN_AMAX) / FP8_MAX
    # The cast rounds to nearest even; out-of-range values would become NaN, so saturate first.
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_kernels(device: torch.device) -> bool:
    """Whether `device` has FP8 tensor cores (Ada sm89, Hopper sm90 and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """nn.Linear with e4m3 weights and per-row scales; output in `out_dtype`. Its products are made as a
    TiledLinear's (invariance.settled_product); the tensor cores have no batched FP8 product, so there the
    tiles are one call each."""

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16, tile_rows: int = TILE_ROWS) -> None:
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # [out, in] e4m3
        self.register_buffer("weight_scale", scale.T.contiguous())  # [1, out] fp32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(out_dtype), requires_grad=False)
        self.out_dtype, self.tile_rows = out_dtype, tile_rows
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.tensor_cores = fp8_kernels(weight.device)  # the device it is made on (quantize_trunk: the layer's)
        self.one_call_rows = 0  # as TiledLinear's (invariance.settle_products)
        self.batched = not self.tensor_cores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = settled_product(self, x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """One call over `rows` [M, in] (no bias): on the tensor cores, or emulated in one fp32 product."""
        if not self.tensor_cores:
            return _emulated(rows, self.weight, self.weight_scale, self.out_dtype, F.linear)
        values, scale = quantize_rows(rows)
        return torch._scaled_mm(values, self.weight.T, scale_a=scale, scale_b=self.weight_scale, out_dtype=self.out_dtype)

    def batched_tiles(self, rows: torch.Tensor) -> torch.Tensor:
        """The emulation's tiles in one batched fp32 product; none on the tensor cores."""
        if self.tensor_cores:
            raise RuntimeError("no batched FP8 product on tensor cores: one call per tile")
        return _emulated(
            rows, self.weight, self.weight_scale, self.out_dtype, lambda values, weight: tiled_matmul(values, weight, self.tile_rows)
        )


def _emulated(rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out_dtype: torch.dtype, matmul) -> torch.Tensor:
    """The tensor cores' arithmetic in fp32: exact products of the e4m3 values, fp32 sums (by `matmul`)."""
    values, scale = quantize_rows(rows)
    return (matmul(values.float(), weight.float()) * scale * weight_scale).to(out_dtype)


def quantize_trunk(trunk: nn.Module, device: torch.device, tile_rows: int = TILE_ROWS, bf16_layers: int = 0) -> nn.Module:
    """Swap every nn.Linear inside the decoder layers but the first `bf16_layers` for an Fp8Linear
    (embeddings, final norm stay), one layer at a time on `device`."""
    if bf16_layers > len(trunk.layers):
        raise ValueError(f"fp8_bf16_layers {bf16_layers}: the model has {len(trunk.layers)} decoder layers")
    for index, layer in enumerate(trunk.layers):
        layer.to(device)
        if index < bf16_layers:
            continue
        replace_modules(layer, lambda child: Fp8Linear(child, tile_rows=tile_rows) if isinstance(child, nn.Linear) else None)
    return trunk
