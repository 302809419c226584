"""`cuda_graphs` (step_graphs.py): step shapes, the refusals a CPU can check, and on a GPU the bits of the
steps run from Python (skipped here: this machine has no GPU; benchmarks/gpu_checks.py --only graphs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reward_server.runtimes.torch_runtime import Packing, TorchRewardEngine
from reward_server.settings import Settings
from reward_server.step_graphs import padded_bounds, segment_bucket


def test_a_step_shape_is_its_rows_and_a_power_of_two_of_segments():
    assert [segment_bucket(n) for n in (1, 2, 8, 9, 16, 17, 100)] == [8, 8, 8, 16, 16, 32, 128]
    assert padded_bounds([3, 5, 1], 8).tolist() == [0, 3, 8, 9, 9, 9, 9, 9, 9]  # empty segments after the last
    assert padded_bounds([3, 5, 1], 8).dtype == np.int32  # what the varlen kernel takes


def test_the_setting_reaches_the_engine_and_is_refused_where_it_cannot_run(checkpoint):
    assert Settings.resolve([], {"REWARD_CUDA_GRAPHS": "true"}).cuda_graphs is True
    assert Settings.resolve([], {}).cuda_graphs is False
    with pytest.raises(ValueError, match="cuda_graphs needs attention varlen: a CUDA GPU"):
        TorchRewardEngine(str(checkpoint), device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs needs tensor_parallel 1"):
        TorchRewardEngine(str(checkpoint), device="cpu", tensor_parallel=2, cuda_graphs=True)  # refused before any rank starts


def test_a_layer_outside_the_varlen_kernel_cannot_be_captured(checkpoint):
    """A capture's bounds exist on the device only: a layer that would need them on the host (a sliding
    window, soft-capping, or no varlen kernel at all, as on this CPU) fails the capture, and with it the load."""
    engine = TorchRewardEngine(str(checkpoint), device="cpu")
    ids = torch.zeros((1, 8), dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"layer 0 .* cannot run in the varlen kernel"):
        engine._trunk(ids, torch.arange(8)[None], Packing([], None, 0, None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphs_give_the_bits_of_steps_run_from_python(checkpoint, tokenizer):
    from tests.corpus import conversations

    ids = [np.array(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in conversations()]
    plain = TorchRewardEngine(str(checkpoint), device="cuda", dtype="bf16")
    graphed = TorchRewardEngine(str(checkpoint), device="cuda", dtype="bf16", cuda_graphs=True)
    expected = plain.score(ids)
    assert np.array_equal(graphed.score(ids), expected)
    assert all(np.array_equal(graphed.score([s])[0], expected[i]) for i, s in enumerate(ids))
    assert len(graphed.graphs.graphs) > 1 and not graphed.graphs.failed
