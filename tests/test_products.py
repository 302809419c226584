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


def _split_unless_whole(weight: torch.Tensor, tile: int):
    """A product whose sums run in another order at row counts above 64 that are not whole `tile`s."""
    split = _split_sums(weight, 0)
    return lambda rows: split(rows) if len(rows) > 64 and len(rows) % tile else rows @ weight.T


def test_with_a_coarse_tile_only_the_one_call_is_tried_at_the_fine_one():
    """`coarse_tile` (tile_rows auto on a CPU): a layer keeps its own 64-row tile only where one call is proven
    at it; otherwise one call, the batched tiles and one call per tile are tried at 256 rows, which it keeps.
    Whatever it settled on, its rows at any whole number of 64-row tiles are those of its tiles' own calls."""
    torch.manual_seed(2)
    model = make_batch_invariant(nn.Sequential(*(nn.Linear(96, 96, bias=False) for _ in range(4))), tile_rows=64)
    fine, coarse, batched, per_tile = model
    for index, layer in enumerate(model):  # distinct weights, distinct probes: give each its own shape's key
        layer.weight = nn.Parameter(layer.weight.detach()[: 96 - 8 * index])
    fine.product = lambda rows: tile_calls(lambda t: t @ fine.weight.T, rows, 64)  # whatever the CPU's mm does: proven
    coarse.product = _split_unless_whole(coarse.weight.detach(), 256)
    batched.product = _split_sums(batched.weight.detach(), 512)
    per_tile.product = per_tile.batched_tiles = _split_sums(per_tile.weight.detach(), 512)
    choices = settle_products(model, 1000, coarse_tile=256)
    expected = [(64, "one call"), (256, "one call"), (256, "batched tiles"), (256, "tile calls")]
    assert [(key[3], way) for key, way in choices.items()] == expected
    assert [layer.tile_rows for layer in model] == [64, 256, 256, 256]
    assert [layer.one_call_rows for layer in model] == [1024, 1024, 0, 0]
    with torch.inference_mode():
        for layer in model:
            inputs = torch.randn(1536, 96)
            tile = layer.tile_rows
            own = torch.cat([layer.product(inputs[i : i + tile]) for i in range(0, 1536, tile)])
            for count in (64, 320, 1024, 1088):  # 1,088: beyond the probed rows
                assert torch.equal(layer(inputs[:count]), own[:count]), (layer, count)


def test_a_product_the_device_cannot_make_keeps_the_tiles():
    model = make_batch_invariant(nn.Sequential(nn.Linear(32, 32, bias=False)))

    def refuses(self, rows):
        raise RuntimeError("no such kernel here")

    model[0].product = types.MethodType(refuses, model[0])
    assert list(settle_products(model, 512).values()) == ["batched tiles"] and model[0].one_call_rows == 0


def test_a_layer_whose_every_product_fails_is_refused_at_load():
    """Left to one call per tile, it failed at every step of the server (FP8 shapes the tensor cores refuse)."""
    model = make_batch_invariant(nn.Sequential(nn.Linear(32, 32, bias=False)))

    def refuses(self, rows):
        raise RuntimeError("no such kernel here")

    model[0].product = model[0].batched_tiles = types.MethodType(refuses, model[0])
    with pytest.raises(RuntimeError, match="no such kernel here"):
        settle_products(model, 512)


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
