"""`cuda_graphs` (step_graphs.py): step shapes, the refusals a CPU can check, a CPU emulation of capture and
replay, and on a GPU the bits of the steps run from Python (skipped here: this machine has no GPU;
benchmarks/gpu_checks.py --only graphs).

The emulation stands in for what cannot run here (CUDA graphs, FlashAttention's varlen kernel): a capture
records the aten operations of the forward, and a replay runs them again on the very tensors they ran on,
writing each result where the capture's result lives, as a graph's kernels work on the memory of the capture.
A forward that used a value known on the host at capture (a step's bounds, its length, anything but the
graph's buffers) would replay the captured step instead of the new one, and an operation that waits for
the device (`.item()`, `bool(tensor)`) fails the capture, as it would on a GPU. What it cannot show: that
CUDA accepts every kernel, and FlashAttention's own bits (gpu_checks)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM

from reward_server import step_graphs, varlen
from reward_server.invariance import TILE_ROWS, whole_tiles
from reward_server.memory import module_bytes, step_memory
from reward_server.runtimes import torch_runtime
from reward_server.runtimes.torch_runtime import Packing, TorchRewardEngine
from reward_server.settings import Settings
from reward_server.step_graphs import padded_bounds, segment_bucket
from tests.test_architectures import CONFIGS, _engine, _save, _sequences

WAITS_FOR_THE_DEVICE = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default}


def test_a_step_shape_is_its_rows_and_a_power_of_two_of_segments():
    assert [segment_bucket(n) for n in (1, 2, 8, 9, 16, 17, 100)] == [8, 8, 8, 16, 16, 32, 128]
    assert padded_bounds([3, 5, 1], 8).tolist() == [0, 3, 8, 9, 9, 9, 9, 9, 9]  # empty segments after the last
    assert padded_bounds([3, 5, 1], 8).dtype == np.int32  # what the varlen kernel takes


def test_the_setting_reaches_the_engine_and_is_refused_where_it_cannot_run(checkpoint):
    assert Settings.resolve([], {"REWARD_CUDA_GRAPHS": "true"}).cuda_graphs is True
    assert Settings.resolve([], {}).cuda_graphs is False
    with pytest.raises(ValueError, match="cuda_graphs needs attention varlen: a CUDA GPU"):
        TorchRewardEngine(str(checkpoint), device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs needs attention varlen"):  # before any checkpoint is read
        TorchRewardEngine(str(checkpoint / "no-such-folder"), device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs needs tensor_parallel 1"):
        TorchRewardEngine(str(checkpoint), device="cpu", tensor_parallel=2, cuda_graphs=True)  # refused before any rank starts


def test_a_layer_outside_the_varlen_kernel_cannot_be_captured(checkpoint):
    """A capture's bounds exist on the device only: a layer that would need them on the host (a sliding
    window, soft-capping, or no varlen kernel at all, as on this CPU) fails the capture, and with it the load."""
    engine = TorchRewardEngine(str(checkpoint), device="cpu")
    ids = torch.zeros((1, 8), dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"layer 0 .* cannot run in the varlen kernel"):
        engine._trunk(ids, torch.arange(8)[None], Packing([], None, 0, None))


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in WAITS_FOR_THE_DEVICE:
            raise RuntimeError(f"{func} waits for the device: not permitted while a stream is capturing")
        out = func(*args, **(kwargs or {}))
        # An alias of an input (a view, or `to` that converted nothing) sees what is written there; anything
        # else is run again. Its schema does not tell: `to` is marked as a view even when it copies.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        outputs = [t.untyped_storage().data_ptr() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        alias = not func._schema.is_mutable and bool(outputs) and all(o in inputs for o in outputs)
        if not alias:
            self.calls.append((func, args, kwargs or {}, out))
        return out


class _EmulatedGraph:
    captures = replays = 0

    def __init__(self) -> None:
        self.calls: list = []

    def replay(self) -> None:
        type(self).replays += 1
        for func, args, kwargs, out in self.calls:
            for fresh, kept in zip(tree_leaves(func(*args, **kwargs)), tree_leaves(out), strict=True):
                if isinstance(kept, torch.Tensor) and fresh.data_ptr() != kept.data_ptr():
                    kept.copy_(fresh)


class _Stream:
    def wait_stream(self, other) -> None:
        pass


@pytest.fixture
def emulated_graphs(monkeypatch):
    """torch.cuda's graph API on a CPU (above), and the varlen kernel as one SDPA call with a block-diagonal
    causal mask made on the device from the bounds (the kernel takes them as device tensors too)."""
    capturing = []

    @contextlib.contextmanager
    def graph(made, pool=None, stream=None, capture_error_mode="global"):
        recorder = _Recorder()
        capturing.append(True)
        try:
            with recorder:
                yield
        finally:
            capturing.pop()
        made.calls = recorder.calls
        _EmulatedGraph.captures += 1

    def attend(query, key, value, batch, scale):
        rows = torch.arange(query.shape[0])
        segment = torch.searchsorted(batch.cu_q.long(), rows, right=True)
        visible = (segment[:, None] == segment[None, :]) & (rows[None, :] <= rows[:, None])
        q, k, v = (t.transpose(0, 1)[None] for t in (query, key, value))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)[0].transpose(0, 1)

    _EmulatedGraph.captures = _EmulatedGraph.replays = 0
    for name, fake in {
        "CUDAGraph": _EmulatedGraph,
        "graph": graph,
        "graph_pool_handle": lambda: None,
        "Stream": lambda device=None: _Stream(),
        "current_stream": lambda device=None: _Stream(),
        "stream": lambda stream: contextlib.nullcontext(),
        "device": lambda device: contextlib.nullcontext(),
        "is_current_stream_capturing": lambda: bool(capturing),  # what transformers asks before a check that waits
    }.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(varlen, "available", lambda device, dtype: True)
    monkeypatch.setattr(varlen, "attend", attend)
    monkeypatch.setattr(step_graphs, "MAX_ROWS", 512)  # the emulation keeps every graph's tensors: 10 shapes, not 40
    monkeypatch.setattr(torch_runtime, "CPU_TILE_ROWS", TILE_ROWS)  # a GPU's tiles (tile_rows auto)
    return _EmulatedGraph


def test_a_segment_longer_than_its_shape_was_sized_for_runs_from_python(emulated_graphs, checkpoint, token_ids):
    """The varlen kernel's grid is sized at capture for the longest segment a shape may hold (`max_tokens`, or
    the step's rows): a longer one (the engine's API does not enforce max_tokens) would leave rows unwritten."""
    plain = TorchRewardEngine(str(checkpoint), device="cpu", max_tokens=64)
    graphed = TorchRewardEngine(str(checkpoint), device="cpu", max_tokens=64, cuda_graphs=True)  # segments up to 256 (a tile)
    long = np.concatenate([token_ids[0]] * 8)[:300]
    assert np.array_equal(graphed.score([long]), plain.score([long]))
    assert (512, 8) in graphed.graphs.graphs and emulated_graphs.replays == 0  # the shape exists; the segment is too long for it
    assert np.array_equal(graphed.score([long[:200]]), plain.score([long[:200]]))  # 256 rows: replayed
    assert emulated_graphs.replays == 1


def test_a_replayed_step_is_the_new_step_not_the_captured_one(emulated_graphs, checkpoint, token_ids):
    plain = TorchRewardEngine(str(checkpoint), device="cpu", max_step_tokens=1024)  # the same emulated varlen kernel, from Python
    graphed = TorchRewardEngine(str(checkpoint), device="cpu", max_step_tokens=1024, cuda_graphs=True)
    # every shape at load: steps of 256 and 512 rows (MAX_ROWS, as the fixture sets it), segment buckets 8 to 128
    assert plain.varlen and sorted(graphed.graphs.graphs) == [(rows, 1 << n) for rows in (256, 512) for n in range(3, 8)]
    assert emulated_graphs.captures == 10
    batches = [token_ids[:1], token_ids[1:2], token_ids[2:5], token_ids[5:8], token_ids[:16], token_ids[16:32], token_ids[:1]]
    for batch in batches:
        assert np.array_equal(graphed.score(batch), plain.score(batch))
    rows = [whole_tiles(sum(len(batch[i]) for i in step.indices), 256) for batch in batches for step in plain.plan(batch)]
    assert min(rows) <= 512 < max(rows)  # steps of both kinds
    # nothing captured while scoring; steps of up to MAX_ROWS rows replayed, larger ones run from Python
    assert emulated_graphs.captures == 10 and emulated_graphs.replays == sum(r <= 512 for r in rows)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_family_replays_its_steps_or_is_refused_at_load(emulated_graphs, family, tmp_path):
    """Qwen2's biases, Nemotron's partial rotary and LayerNorm replay as run from Python; Mistral's and
    Gemma 2's windows (and Gemma 2's soft-capping) need the per-sequence path, which a graph cannot hold."""
    torch.manual_seed(60)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS[family]()), tmp_path)
    if family in ("mistral", "gemma2"):
        with pytest.raises(ValueError, match="cannot run in the varlen kernel"):
            _engine(folder, cuda_graphs=True)
        return
    sequences = _sequences(60)[:5]  # no shared prompt: every step replays
    plain, graphed = _engine(folder), _engine(folder, cuda_graphs=True)
    for batch in (sequences[:2], sequences[2:4], sequences):
        assert np.array_equal(graphed.score(batch), plain.score(batch))
    assert emulated_graphs.replays >= 3


def test_fp8_replays_its_steps(emulated_graphs, checkpoint, token_ids):
    plain = TorchRewardEngine(str(checkpoint), device="cpu", dtype="fp8")
    graphed = TorchRewardEngine(str(checkpoint), device="cpu", dtype="fp8", cuda_graphs=True)
    for batch in (token_ids[:3], token_ids[3:6]):
        assert np.array_equal(graphed.score(batch), plain.score(batch))


def test_a_forward_that_waits_for_the_device_is_refused_at_load(emulated_graphs, checkpoint, monkeypatch):
    """transformers checks the positions for packed sequences with a host read unless a stream is capturing:
    told that none is, its check fails the capture, and the load says so."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(ValueError, match=r"cuda_graphs: the model's forward cannot be captured in a CUDA graph: .*waits for the device"):
        TorchRewardEngine(str(checkpoint), device="cpu", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphs_give_the_bits_of_steps_run_from_python(checkpoint, token_ids):
    ids = token_ids
    plain = TorchRewardEngine(str(checkpoint), device="cuda", dtype="bf16")
    graphed = TorchRewardEngine(str(checkpoint), device="cuda", dtype="bf16", cuda_graphs=True)
    expected = plain.score(ids)
    assert np.array_equal(graphed.score(ids), expected)
    assert all(np.array_equal(graphed.score([s])[0], expected[i]) for i, s in enumerate(ids))
    assert len(graphed.graphs.graphs) > 1


def test_the_memory_plan_holds_the_graphs_step_beside_the_others(emulated_graphs, checkpoint):
    """The graphs' pool keeps the activations of one step of MAX_ROWS rows (512 here; no shared-prefix keys/values)
    for good: a budget that fits 2,048-token steps beside them and not one byte less gives 2,048-token steps with
    graphs, fewer below."""
    plain = TorchRewardEngine(str(checkpoint), device="cpu", max_tokens=256)
    memory = step_memory(plain.trunk.config, 4, 1, 256)
    budget = module_bytes(plain.trunk, plain.head.weight) + memory.bytes(2048) + (memory.per_token - memory.prefix_kv) * 512
    planned = {
        b: TorchRewardEngine(str(checkpoint), device="cpu", max_tokens=256, memory_budget=b, cuda_graphs=True) for b in (budget, budget - 1)
    }
    assert planned[budget].max_step_tokens == 2048 and planned[budget - 1].max_step_tokens == 1792
    assert TorchRewardEngine(str(checkpoint), device="cpu", max_tokens=256, memory_budget=budget - 1).max_step_tokens == 2048
