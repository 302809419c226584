"""FP8 (`dtype: fp8`): the quantisation scheme by hand, the emulated product, the engine against fp32,
batch invariance bit for bit, and the fp8 path through the real server.

On a CPU the tensor cores' arithmetic is emulated (fp8.py): these tests prove the numerics and the
wiring; the kernels themselves run only on a GPU (benchmarks/gpu_fp8_tp.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from reward_client import RewardClient
from reward_server.fp8 import FP8, Fp8Linear, quantize_rows
from reward_server.runtimes.torch_runtime import TorchRewardEngine
from tests.corpus import conversations

# FP8 against fp32 on the demo checkpoint's corpus (scores' std 0.3): measured max 0.112, mean 0.038
# (benchmarks/fidelity.py gives the same on 64 conversations; bf16: max 0.006).
MAX_TOLERANCE, MEAN_TOLERANCE = 0.2, 0.06


def _e4m3_grid() -> torch.Tensor:
    """Every finite e4m3 value, from its 256 bit patterns (independent of torch's float -> e4m3 cast)."""
    values = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    return values[values.isfinite()].unique()


def test_quantize_rows_by_hand():
    """Scale = amax / 448; 74.67 -> 72 and 149.3 -> 144 (3 mantissa bits), the row's max -> 448, 0 -> 0,
    a tie (76) to the even mantissa (80), and an all-zero row stays zero with a finite scale."""
    x = torch.tensor([[0.5, -1.0, 3.0, 0.0], [76.0, 448.0, -448.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    values, scale = quantize_rows(x)
    assert values.dtype == FP8 and scale.shape == (3, 1) and scale.dtype == torch.float32
    assert scale[0, 0].item() == pytest.approx(3.0 / 448) and scale[1, 0].item() == 1.0
    assert values[0].float().tolist() == [72.0, -144.0, 448.0, 0.0]
    assert values[1].float().tolist() == [80.0, 448.0, -448.0, 1.0]
    assert values[2].float().tolist() == [0.0] * 4 and torch.isfinite(scale[2]).all() and scale[2, 0] > 0


def test_quantize_rows_is_round_to_nearest_on_the_e4m3_grid():
    """Random rows over 12 orders of magnitude: each value is the nearest e4m3 value to x / scale, nothing
    saturates to NaN, and every row reaches ±448 at its largest entry."""
    torch.manual_seed(0)
    x = torch.randn(64, 200) * torch.logspace(-6, 6, 64)[:, None]
    values, scale = quantize_rows(x)
    grid = _e4m3_grid()
    target = x / scale
    nearest = grid[(target[..., None] - grid).abs().argmin(-1)]
    distance = (target - values.float()).abs()
    assert torch.all(distance <= (target - nearest).abs() + 1e-6 * target.abs())
    assert not torch.isnan(values.float()).any()
    assert torch.equal(values.float().abs().amax(-1), torch.full((64,), 448.0))


def test_fp8_linear_is_the_scaled_e4m3_product():
    """Output = (q_x @ q_w.T) * s_x * s_w (+ bias), rounded once to bf16; per-row weight scales."""
    torch.manual_seed(1)
    linear = nn.Linear(96, 48, bias=True)
    layer = Fp8Linear(linear)
    x = torch.randn(70, 96, dtype=torch.bfloat16)
    qx, sx = quantize_rows(x)
    qw, sw = quantize_rows(linear.weight.detach())
    expected = (qx.double() @ qw.double().T) * sx.double() * sw.double().T
    bias = linear.bias.detach().to(torch.bfloat16).double()
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (70, 48)
    # two roundings to bf16 (unit roundoff 2^-8): the product, then its sum with the bias
    assert torch.all((got.double() - (expected + bias)).abs() <= 2**-7 * (expected.abs() + bias.abs()))
    exact = linear(x.float()).detach().double()
    assert (got.double() - exact).norm() / exact.norm() < 0.05  # e4m3 keeps ~2 significant digits


@pytest.mark.parametrize("tile_rows", [64, 256])
def test_fp8_rows_do_not_depend_on_their_neighbours(tile_rows):
    """A row alone, first among 63 huge rows, and in the middle of 200 rows: bit for bit."""
    torch.manual_seed(2)
    layer = Fp8Linear(nn.Linear(64, 32, bias=False), tile_rows=tile_rows)
    row = torch.randn(1, 64, dtype=torch.bfloat16)
    alone = layer(row)
    crowd = torch.cat([row, 1e4 * torch.randn(63, 64, dtype=torch.bfloat16)])
    middle = torch.cat([torch.randn(100, 64, dtype=torch.bfloat16), row, torch.randn(99, 64, dtype=torch.bfloat16)])
    assert torch.equal(layer(crowd)[:1], alone)
    assert torch.equal(layer(middle)[100:101], alone)


@pytest.fixture(scope="module")
def fp8_engine(checkpoint):
    return TorchRewardEngine(str(checkpoint), device="cpu", dtype="fp8", max_step_tokens=8192)


def test_fp8_engine_quantises_the_trunk_only(fp8_engine):
    layer = fp8_engine.trunk.layers[0]
    assert isinstance(layer.self_attn.qkv_proj.linear, Fp8Linear) and isinstance(layer.mlp.down_proj, Fp8Linear)
    assert layer.self_attn.qkv_proj.linear.weight.dtype == FP8
    assert fp8_engine.trunk.norm.weight.dtype == torch.bfloat16
    assert fp8_engine.trunk.get_input_embeddings().weight.dtype == torch.bfloat16
    assert fp8_engine.head.weight.dtype == torch.bfloat16  # the head computes in fp32 (heads.RewardHead)


def test_fp8_engine_against_fp32(fp8_engine, checkpoint, token_ids):
    exact = TorchRewardEngine(str(checkpoint), device="cpu", dtype="fp32", max_step_tokens=8192).score(token_ids)[:, 0]
    got = fp8_engine.score(token_ids)[:, 0]
    worst = np.abs(got - exact).max()
    print(f"fp8 vs fp32 on {len(token_ids)} conversations: max |Δ| {worst:.4f}, mean {np.abs(got - exact).mean():.4f}")
    assert 0 < worst <= MAX_TOLERANCE and np.abs(got - exact).mean() <= MEAN_TOLERANCE


def test_fp8_batch_invariance(fp8_engine, token_ids):
    """One conversation alone and in mixed packed batches: one value, bit for bit."""
    batch = token_ids[:8]
    assert len({len(ids) for ids in batch}) >= 6  # mixed lengths
    together = fp8_engine.score([*batch, batch[3]])[:, 0]
    alone = np.array([fp8_engine.score([ids])[0, 0] for ids in batch])
    shuffled = fp8_engine.score([batch[3], *token_ids[8:16], *batch[:3]])[:, 0]
    assert np.array_equal(together[:8], alone)
    assert together[8] == alone[3] == shuffled[0]


def test_fp8_through_the_server(tmp_path, checkpoint, fp8_engine, token_ids):
    """REWARD_DTYPE=fp8: the server's scores are the fp8 engine's, not fp32's."""
    from tests.live_server import start_server, stop_server

    convs = conversations()[:6]
    server = start_server(tmp_path / "server.log", env={"REWARD_CHECKPOINT": str(checkpoint), "REWARD_DTYPE": "fp8"})
    try:
        with RewardClient(server.grpc_url) as client:
            got = np.array(client.score_batch(convs))
    finally:
        stop_server(server)
    expected = fp8_engine.score(token_ids[:6])[:, 0]
    exact = TorchRewardEngine(str(checkpoint), device="cpu", dtype="fp32").score(token_ids[:6])[:, 0]
    assert np.abs(got - expected).max() <= 1e-6
    assert np.abs(got - exact).max() > 1e-4  # fp8 really ran


def test_the_first_layers_can_stay_bf16(checkpoint, fp8_engine, token_ids):
    """fp8_bf16_layers N: the first N decoder layers keep bf16 weights (the errors every later layer
    amplifies), the rest are FP8; all of them kept is the bf16 engine, bit for bit, on one rank and on
    two; more than the model has is refused; batch invariance holds."""
    kept = TorchRewardEngine(str(checkpoint), device="cpu", dtype="fp8", max_step_tokens=8192, fp8_bf16_layers=1)
    layers = kept.trunk.layers
    qkv = layers[0].self_attn.qkv_proj.linear
    assert not isinstance(qkv, Fp8Linear) and qkv.weight.dtype == torch.bfloat16
    assert all(isinstance(layer.mlp.down_proj, Fp8Linear) for layer in layers[1:])
    batch = token_ids[:8]
    together = kept.score(batch)[:, 0]
    assert np.array_equal(together, [kept.score([ids])[0, 0] for ids in batch])
    assert not np.array_equal(together, fp8_engine.score(batch)[:, 0])
    bf16 = {world: TorchRewardEngine(str(checkpoint), device="cpu", dtype="bf16", tensor_parallel=world) for world in (1, 2)}
    for world, engine in bf16.items():
        every = TorchRewardEngine(str(checkpoint), device="cpu", dtype="fp8", tensor_parallel=world, fp8_bf16_layers=len(layers))
        try:
            assert np.array_equal(every.score(batch), engine.score(batch)), f"TP {world}"
        finally:
            every.close()
            engine.close()
    with pytest.raises(ValueError, match=f"fp8_bf16_layers 9: the model has {len(layers)} decoder layers"):
        TorchRewardEngine(str(checkpoint), device="cpu", dtype="fp8", fp8_bf16_layers=9)
