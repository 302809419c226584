"""One product call per layer, where the load's probe proves it keeps every row's bits (invariance.py)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from reward_server.fp8 import Fp8Linear
from reward_server.invariance import make_batch_invariant, one_call_keeps_rows, settle_products, tiled_matmul


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
    assert one_call_keeps_rows(lambda r: tiled_matmul(r, weight, 256), rows, 256)


def test_layers_take_one_call_only_where_their_shape_passed():
    torch.manual_seed(1)
    model = make_batch_invariant(nn.Sequential(nn.Linear(96, 48, bias=False), nn.Linear(48, 96)))
    kept, split = model[0], model[1]
    split.product = _split_sums(split.weight.detach(), 512)
    verdicts = settle_products(model, 1000)  # rounded up to whole tiles: 1,024 rows
    assert list(verdicts.values()) == [kept.one_call_rows > 0, False] and kept.one_call_rows in (0, 1024)
    assert split.one_call_rows == 0
    with torch.inference_mode():
        for layer, inputs in ((kept, torch.randn(1280, 96)), (split, torch.randn(1280, 48))):
            bias = 0 if layer.bias is None else layer.bias
            tiles = tiled_matmul(inputs, layer.weight, 256) + bias
            assert torch.equal(layer(inputs), tiles)  # 1,280 rows: beyond the probed rows, tiles again
            if layer.one_call_rows:  # one call: each tile's bits are its own call's, at every row count
                own = torch.cat([layer.product(inputs[i : i + 256]) for i in range(0, 1024, 256)]) + bias
                assert all(torch.equal(layer(inputs[:count]), own[:count]) for count in (256, 512, 1024))
            else:
                assert all(torch.equal(layer(inputs[:count]), tiles[:count]) for count in (256, 512, 1024))


def test_a_product_the_device_cannot_make_keeps_the_tiles():
    model = make_batch_invariant(nn.Sequential(nn.Linear(32, 32, bias=False)))

    def refuses(self, rows):
        raise RuntimeError("no such kernel here")

    model[0].product = types.MethodType(refuses, model[0])
    assert list(settle_products(model, 512).values()) == [False] and model[0].one_call_rows == 0


@pytest.mark.parametrize("tile_rows", [64, 256])
def test_fp8_one_call_keeps_each_tiles_bits_where_proven(tile_rows):
    torch.manual_seed(2)
    layer = Fp8Linear(nn.Linear(64, 32, bias=False), tile_rows=tile_rows)
    x = torch.randn(4 * tile_rows, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        tiles = layer(x)
        settle_products(nn.Sequential(layer), len(x))
        if not layer.one_call_rows:
            pytest.skip("this CPU's fp32 product is not row-count invariant at these shapes")
        whole = layer(x)
        assert torch.equal(whole, torch.cat([layer.product(x[i : i + tile_rows]) for i in range(0, len(x), tile_rows)]))
        assert (whole.float() - tiles.float()).abs().max() <= 1e-2 * tiles.float().abs().max()  # the tiles' sums, reordered
