"""Batch invariance: a sequence's score must not depend on what else is packed with it.

Linear layers are the one place where it would: a matrix product's kernel (and so the order of its
floating-point sums) depends on how many rows it gets, so the same row can come out a few ulps
apart in a step of 37 rows and in one of 2,048. Here every linear layer and the reward head work on
fixed tiles of `tile_rows` rows (the engine fills its packed row up to whole tiles, other callers' rows are
zero-padded), and a layer's product is made in one of three ways, each giving every tile the bits of that
tile's own call:
- one call over all the rows, where a probe proved it (below);
- one batched call over the tiles (`bmm`), where a probe proved it: a batched kernel too may be chosen by
  the number of tiles (on a CPU, oneDNN's bf16 `bmm` gave a tile other bits in a batch of 5 tiles than alone);
- one call per tile, the same call whatever the row count: invariant by construction, the fallback.
Everything else in the trunk is per row (embeddings, norms, rotary, activations) or per sequence
(attention). A tile's rows are also the step's granularity: the engine fills its packed row up to whole
tiles, and that filler is computed like real rows. Made in tiles, a product wants large ones: a 64-row
tile reads each weight for 64 rows only, too few to keep a GPU's tensor cores busy (an H200's 70B-wide
layer: 103 ms at 64 rows, 55 ms at 256, benchmarks/gpu_fp8_tp.py) or an AVX-512 CPU's FMA units (the
bench checkpoint's products: 64-row tiles ~78 % of one plain matmul, 256-row tiles ~94 %). Made in one
call, a product does not care, and small tiles only shrink the filler (a CPU's 2,048-token steps: 6.4 %
of the long mix's rows at 256, 1.5 % at 64). So `tile_rows: auto` is, on a CPU, CPU_TILE_ROWS wherever a
layer's one call is proven at that granularity and TILE_ROWS for the other layers (`settle_products`'
`coarse_tile`; their steps' last tile is then zero-padded), and TILE_ROWS on a GPU (unmeasured there at 64:
probes of 16,384-row steps at that granularity, and CUDA graphs' step shapes). Identical sequences of one
batch are scored once (batching.unique), so copies never form a shared-prefix group among themselves.

The probes: whether a library's product over M rows gives every tile the bits of that tile alone depends on
the library, the device and the layer's shape (one H200, torch 2.11: FP8 `_scaled_mm` with row-wise scales
did at every row count on the 8B and 70B shapes; cuBLAS's bf16 product did for some shapes and not for the
down projections). So it is not assumed: at load `settle_products` runs each shape's product at every row
count the engine can make (whole tiles up to its largest step) and compares every tile of it, bit for bit,
with that tile's own call; one call, else the batched call, wins only if all of them agree; steps above the
probed rows take the layer's tiles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from reward_server.module_swap import replace_modules

TILE_ROWS = 256
CPU_TILE_ROWS = 64  # tile_rows auto on a CPU, for the layers whose one call is proven at it (module docstring)
Product = Callable[[torch.Tensor], torch.Tensor]


def tiled_matmul(x: torch.Tensor, weight: torch.Tensor, tile_rows: int = TILE_ROWS) -> torch.Tensor:
    """x [..., in] @ weight.T, computed in tiles of `tile_rows` rows, as one batched product."""
    rows = x.reshape(-1, x.shape[-1])
    padded = _whole_tile_rows(rows, tile_rows)
    tiles = padded.shape[0] // tile_rows
    out = torch.bmm(padded.view(tiles, tile_rows, -1), weight.T.unsqueeze(0).expand(tiles, -1, -1)).view(tiles * tile_rows, -1)
    return out[: rows.shape[0]].view(*x.shape[:-1], weight.shape[0])


def _whole_tile_rows(rows: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """`rows` [M, in], zero-padded up to whole tiles (none for the engine's packed rows: no copy)."""
    short = -rows.shape[0] % tile_rows
    return F.pad(rows, (0, 0, 0, short)) if short else rows


def whole_tiles(rows: int, tile_rows: int) -> int:
    """`rows` rounded up to whole tiles."""
    return -(-rows // tile_rows) * tile_rows


def tile_calls(product: Product, rows: torch.Tensor, tile_rows: int = TILE_ROWS) -> torch.Tensor:
    """`product` called once per tile of `tile_rows` rows (the last zero-padded): one call shape, whatever
    the row count."""
    padded = _whole_tile_rows(rows, tile_rows)
    tiles = [product(padded[i : i + tile_rows]) for i in range(0, len(padded), tile_rows)]
    return (tiles[0] if len(tiles) == 1 else torch.cat(tiles))[: rows.shape[0]]


def one_call_keeps_rows(product: Product, rows: torch.Tensor, tile_rows: int) -> bool:
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
        self.one_call_rows = 0  # up to this many rows (whole tiles) one call keeps them: settle_products
        self.batched = True  # else one call per tile: settle_products

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = settled_product(self, x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.weight.shape[0])
        return out if self.bias is None else out + self.bias

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """One call over `rows` [M, in] (no bias)."""
        return F.linear(rows, self.weight)

    def batched_tiles(self, rows: torch.Tensor) -> torch.Tensor:
        """One batched call over the tiles of `rows` (no bias)."""
        return tiled_matmul(rows, self.weight, self.tile_rows)


def settled_product(layer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """A tiled layer's product of `rows` [M, in], made the way `settle_products` chose for it."""
    if rows.shape[0] <= layer.one_call_rows and rows.shape[0] % layer.tile_rows == 0:
        return layer.product(rows)
    if layer.batched:
        return layer.batched_tiles(rows)
    return tile_calls(layer.product, rows, layer.tile_rows)


def settle_products(model: nn.Module, max_rows: int, coarse_tile: int | None = None) -> dict[tuple, str]:
    """Choose, per distinct shape of `model`'s tiled layers, how their products are made (the module
    docstring): one call if `one_call_keeps_rows` proves it up to `max_rows` rows (rounded up to whole
    tiles), else the batched tiles if it proves them, else one call per tile. With a `coarse_tile` larger than
    a layer's tile, only its one call is tried at its own tile; the rest (one call again, then the batched
    tiles, then one call per tile) at `coarse_tile`, which the layer then keeps. One probe per shape, on
    random rows made like its inputs. Returns each shape's choice, keyed by the tile it settled on."""
    settled: dict[tuple, tuple[str, int]] = {}
    generator = torch.Generator(device="cpu").manual_seed(0)
    for module in model.modules():
        if not hasattr(module, "one_call_rows"):
            continue
        weight, tile = module.weight, module.tile_rows
        key = (type(module).__name__, tuple(weight.shape), weight.dtype, tile)
        if key not in settled:
            coarse = max(coarse_tile or tile, tile)
            tries = [("one call", tile)] + ([("one call", coarse)] if coarse != tile else []) + [("batched tiles", coarse)]
            dtype = weight.dtype if weight.element_size() > 1 else torch.bfloat16  # FP8 layers take bf16 inputs
            sample = torch.randn(whole_tiles(max_rows, coarse), weight.shape[1], generator=generator).to(weight.device, dtype)
            settled[key] = ("tile calls", coarse)
            for way, rows in tries:
                module.tile_rows = rows  # batched_tiles reads it
                product = module.product if way == "one call" else module.batched_tiles
                if _keeps_rows(product, sample[: whole_tiles(max_rows, rows)], rows):
                    settled[key] = (way, rows)
                    break
            else:  # one call per tile: a product the device cannot make at all fails here, at load, not at every step
                module.tile_rows = coarse
                module.product(sample[:coarse])
            del sample
        way, module.tile_rows = settled[key]
        module.one_call_rows = whole_tiles(max_rows, module.tile_rows) if way == "one call" else 0
        module.batched = way == "batched tiles"
    return {(*key[:3], rows, whole_tiles(max_rows, rows)): way for key, (way, rows) in settled.items()}


def _keeps_rows(product: Product, sample: torch.Tensor, tile: int) -> bool:
    try:
        return one_call_keeps_rows(product, sample, tile)
    except RuntimeError:  # a product this device cannot make (FP8 without its tensor cores)
        return False


def make_batch_invariant(model: nn.Module, tile_rows: int = TILE_ROWS) -> nn.Module:
    """Swap every nn.Linear of `model` for a TiledLinear sharing its parameters."""
    return replace_modules(model, lambda child: TiledLinear(child, tile_rows) if type(child) is nn.Linear else None)
