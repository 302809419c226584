"""One product call per layer, where the load's probe proves it keeps every row's bits (invariance.py)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from reward_server.fp8 import Fp8Linear
from reward_server.invariance import make_batch_invariant, one_call_keeps_rows, settle_products, tile_calls, tiled_matmul


def _split_sums(weight: torch.Tensor, from_rows: int):
    """A product whose sums run in another order from `from_rows` rows on, as a library's split-K does."""

    def product(rows: torch.Tensor) -> torch.Tensor:
        if len(rows) < from_rows:
            return rows @ weight.T
        half = weight.shape[1] // 2
        return rows[:, :half] @ weight[:, :half].T + rows[:, half:] @ weight[:, half:].T

    return product


def test_the_probe_finds_sums_that_change_with_the_row_count():
    torch.manual_seed(0)
    weight, rows = torch.randn(48, 96), torch.randn(1024, 96)
    assert not one_call_keeps_rows(_split_sums(weight, 768), rows, 256)  # only at 768 rows and more
    assert one_call_keeps_rows(lambda r: tile_calls(lambda t: t @ weight.T, r, 256), rows, 256)


def test_each_shape_takes_the_first_way_its_probe_proves():
    """One call where proven; else the batched tiles where proven; else one call per tile (invariant by
    construction). Above the probed rows a one-call layer takes one call per tile."""
    torch.manual_seed(1)
    model = make_batch_invariant(nn.Sequential(nn.Linear(96, 48, bias=False), nn.Linear(48, 96), nn.Linear(96, 96)))
    one_call, batched, per_tile = model
    batched.product = _split_sums(batched.weight.detach(), 512)
    for product in ("product", "batched_tiles"):
        setattr(per_tile, product, _split_sums(per_tile.weight.detach(), 512))
    one_call.product = lambda rows: tiled_matmul(rows, one_call.weight, 256)  # whatever the CPU's mm does: proven
    choices = settle_products(model, 1000)  # rounded up to whole tiles: 1,024 rows
    assert list(choices.values()) == ["one call", "batched tiles", "tile calls"]
    assert (one_call.one_call_rows, batched.one_call_rows, per_tile.one_call_rows) == (1024, 0, 0)
    assert (one_call.batched, batched.batched, per_tile.batched) == (False, True, False)
    with torch.inference_mode():
        for layer in model:
            inputs = torch.randn(1300, layer.weight.shape[1])
            bias = 0 if layer.bias is None else layer.bias
            own = torch.cat([layer.product(inputs[i : i + 256]) for i in range(0, 1280, 256)]) + bias
            for count in (256, 512, 1024, 1280):  # 1,280: beyond the probed rows
                assert torch.equal(layer(inputs[:count]), own[:count]), (layer, count)
            assert torch.equal(layer(inputs)[:1280], own)  # 1,300 rows: the last tile zero-padded


def test_a_product_the_device_cannot_make_keeps_the_tiles():
    model = make_batch_invariant(nn.Sequential(nn.Linear(32, 32, bias=False)))

    def refuses(self, rows):
        raise RuntimeError("no such kernel here")

    model[0].product = types.MethodType(refuses, model[0])
    assert list(settle_products(model, 512).values()) == ["batched tiles"] and model[0].one_call_rows == 0


@pytest.mark.parametrize("tile_rows", [64, 256])
def test_fp8_one_call_keeps_each_tiles_bits_where_proven(tile_rows):
    torch.manual_seed(2)
    layer = Fp8Linear(nn.Linear(64, 32, bias=False), tile_rows=tile_rows)
    x = torch.randn(4 * tile_rows, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        tiles = layer(x)
        settle_products(nn.Sequential(layer), len(x))
        if not layer.one_call_rows:
            pytest.skip("this CPU's fp32 product is not row-count invariant at this shape")
        whole = layer(x)
        assert torch.equal(whole, torch.cat([layer.product(x[i : i + tile_rows]) for i in range(0, len(x), tile_rows)]))
        assert (whole.float() - tiles.float()).abs().max() <= 1e-2 * tiles.float().abs().max()  # the tiles' sums, reordered
