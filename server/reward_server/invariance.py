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

One call instead of a tile's worth of calls where that is proven to give the same bits: a library's
product over M rows may give every row the bits it gets in a call of one tile, whatever M (no split-K, no
kernel whose sums run in another order at some M); then one call per layer keeps batch invariance and
reads each weight once. Whether it does depends on the library, the GPU and the layer's shape (one H200,
torch 2.11: FP8 `_scaled_mm` with row-wise scales did at every row count on the 8B and 70B shapes; cuBLAS's
bf16 product did for some shapes and not for the down projections). So it is not assumed: at load,
`settle_products` runs each shape's product at every row count the engine can make (whole tiles up to its
largest step) and compares every tile of it, bit for bit, with that tile's own call; a layer takes one
call only if all of them agree, and steps above the probed rows go back to tiles.
"""

from __future__ import annotations

from collections.abc import Callable

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


def one_call_keeps_rows(product: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, tile_rows: int) -> bool:
    """Whether `product` over the first M `rows` gives each tile of them the bits of that tile's own call,
    for every M that is a whole number of tiles up to len(rows)."""
    tiles = [product(rows[i : i + tile_rows]) for i in range(0, len(rows), tile_rows)]
    for count in range(2 * tile_rows, len(rows) + 1, tile_rows):
        whole = product(rows[:count])
        if not all(torch.equal(whole[i : i + tile_rows], tiles[i // tile_rows]) for i in range(0, count, tile_rows)):
            return False
    return True


class TiledLinear(nn.Module):
    """nn.Linear whose rows do not depend on the rows beside them."""

    def __init__(self, linear: nn.Linear, tile_rows: int = TILE_ROWS) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.tile_rows = tile_rows
        self.one_call_rows = 0  # up to this many rows (whole tiles) one call is proven to keep them: settle_products

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= self.one_call_rows and rows.shape[0] % self.tile_rows == 0:
            out = self.product(rows).view(*x.shape[:-1], self.weight.shape[0])
        else:
            out = tiled_matmul(x, self.weight, self.tile_rows)
        return out if self.bias is None else out + self.bias

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """One call over `rows` [M, in] (no bias)."""
        return F.linear(rows, self.weight)


def settle_products(model: nn.Module, max_rows: int) -> dict[tuple, bool]:
    """Give each tiled layer of `model` one call per step where `one_call_keeps_rows` proves it for its
    shape up to `max_rows` rows (rounded up to whole tiles); one probe per distinct shape, on random rows
    made like its inputs. Returns each shape's verdict."""
    verdicts: dict[tuple, bool] = {}
    generator = torch.Generator(device="cpu").manual_seed(0)
    for module in model.modules():
        if not hasattr(module, "one_call_rows"):
            continue
        weight, tile = module.weight, module.tile_rows
        rows = -(-max_rows // tile) * tile
        key = (type(module).__name__, tuple(weight.shape), weight.dtype, tile, rows)
        if key not in verdicts:
            dtype = weight.dtype if weight.element_size() > 1 else torch.bfloat16  # FP8 layers take bf16 inputs
            sample = torch.randn(rows, weight.shape[1], generator=generator).to(weight.device, dtype)
            try:
                verdicts[key] = one_call_keeps_rows(module.product, sample, tile)
            except RuntimeError:  # a product this device cannot make (FP8 without its tensor cores): tiles
                verdicts[key] = False
            del sample
        module.one_call_rows = rows if verdicts[key] else 0
    return verdicts


def make_batch_invariant(model: nn.Module, tile_rows: int = TILE_ROWS) -> nn.Module:
    """Swap every nn.Linear of `model` for a TiledLinear sharing its parameters."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, TiledLinear(child, tile_rows))
    return model
