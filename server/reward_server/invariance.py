"""Batch invariance: a sequence's score must not depend on what else is packed with it.

Linear layers are the one place where it would: a matrix product's kernel (and so the order of its
floating-point sums) depends on how many rows it gets, so the same row can come out a few ulps
apart in a step of 37 rows and in one of 2,048. Here every linear layer and the reward head run on
fixed tiles of TILE_ROWS rows (the packed rows as one batched product: the engine fills its
packed row up to whole tiles, other callers' rows are zero-padded), so each row always goes through
the same kernel. Everything else in the trunk is per row
(embeddings, norms, rotary, activations) or per sequence (attention). One tile size on every device:
a 64-row tile reads each weight for 64 rows only, too few to keep a GPU's tensor cores busy (an
H200's 70B-wide layer: 103 ms at 64 rows, 55 ms at 256, benchmarks/gpu_fp8_tp.py) or an AVX-512
CPU's FMA units (the bench checkpoint's products: 64-row tiles ~78 % of one plain matmul, 256-row
tiles ~94 %). The cost of larger tiles is the filler of a step's last tile (`tile_rows` setting). Identical
sequences of one batch are scored once (batching.unique), so copies never form a shared-prefix group
among themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TILE_ROWS = 256


def tiled_matmul(x: torch.Tensor, weight: torch.Tensor, tile_rows: int = TILE_ROWS) -> torch.Tensor:
    """x [..., in] @ weight.T, computed in tiles of `tile_rows` rows."""
    rows = x.reshape(-1, x.shape[-1])
    tiles = -(-rows.shape[0] // tile_rows)
    short = tiles * tile_rows - rows.shape[0]  # none for the engine's packed rows (whole tiles): no copy
    padded = (F.pad(rows, (0, 0, 0, short)) if short else rows).reshape(tiles, tile_rows, -1)
    out = torch.bmm(padded, weight.T.unsqueeze(0).expand(tiles, -1, -1)).view(tiles * tile_rows, -1)
    return out[: rows.shape[0]].view(*x.shape[:-1], weight.shape[0])


class TiledLinear(nn.Module):
    """nn.Linear whose rows do not depend on the rows beside them."""

    def __init__(self, linear: nn.Linear, tile_rows: int = TILE_ROWS) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.tile_rows = tile_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = tiled_matmul(x, self.weight, self.tile_rows)
        return out if self.bias is None else out + self.bias


def make_batch_invariant(model: nn.Module, tile_rows: int = TILE_ROWS) -> nn.Module:
    """Swap every nn.Linear of `model` for a TiledLinear sharing its parameters."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, TiledLinear(child, tile_rows))
    return model
