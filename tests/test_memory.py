"""Memory planning at load (memory.py), on CPU with small `memory_budget`s."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from reward_server.memory import StepMemory, module_bytes, plan_step_tokens, step_memory
from reward_server.runtimes.torch_runtime import TorchRewardEngine
from tests.test_architectures import CONFIGS, _save

PLAN = dict(free=None, max_tokens=4096, default=16384, tile=64)


def test_auto_step_is_what_fits_in_whole_tiles():
    memory = StepMemory(per_token=1000, fixed=0)
    assert plan_step_tokens(memory, weights=1_000_000, budget=11_000_000, max_step_tokens=None, **PLAN) == 9984  # 10,000 -> 156 tiles
    assert plan_step_tokens(memory, weights=0, budget=10**12, max_step_tokens=None, **PLAN) == 16384  # at most the default
    assert plan_step_tokens(memory, weights=0, budget=10**12, max_step_tokens=1234, **PLAN) == 1234  # asked for, and it fits


def test_steps_are_planned_in_whole_tiles_of_the_engine():
    """A step runs as whole tiles (its last one filled up), so the plan counts its rows, not its tokens."""
    memory = StepMemory(per_token=1000, fixed=0)
    assert plan_step_tokens(memory, weights=0, budget=10_100_000, max_step_tokens=None, **PLAN) == 10048  # 157 tiles of 64
    assert plan_step_tokens(memory, weights=0, budget=10_100_000, max_step_tokens=None, **{**PLAN, "tile": 256}) == 9984  # 39 of 256
    memory = StepMemory(per_token=1 << 20, fixed=0)
    assert plan_step_tokens(memory, weights=0, budget=4200 << 20, max_step_tokens=4100, **PLAN) == 4100  # 4,160 rows fit
    with pytest.raises(ValueError, match=r"max_step_tokens 4100 needs 4.25 GiB .* only 4.10 GiB"):  # 4,352 rows do not
        plan_step_tokens(memory, weights=0, budget=4200 << 20, max_step_tokens=4100, **{**PLAN, "tile": 256})


def test_refusals_name_the_numbers():
    memory = StepMemory(per_token=1 << 20, fixed=0)  # 1 MiB a token: 4 GiB for one 4,096-token conversation
    with pytest.raises(ValueError, match=r"one 4096-token conversation needs 4.00 GiB of activations, but only 2.00 GiB is left"):
        plan_step_tokens(memory, weights=1 << 30, budget=3 << 30, max_step_tokens=None, **PLAN)
    with pytest.raises(ValueError, match=r"max_step_tokens 8192 needs 8.00 GiB .* only 6.00 GiB"):
        plan_step_tokens(memory, weights=1 << 30, budget=7 << 30, max_step_tokens=8192, **PLAN)
    free = {**PLAN, "free": 5 << 30}  # a GPU: 90 % of the free memory
    with pytest.raises(ValueError, match=r"only 4.50 GiB is left \(90% of the 5.00 GiB free"):
        plan_step_tokens(memory, weights=1 << 30, budget=None, max_step_tokens=8192, **free)


def test_cpu_without_budget_plans_nothing():
    memory = StepMemory(per_token=1 << 40, fixed=0)
    assert plan_step_tokens(memory, weights=1 << 40, budget=None, max_step_tokens=None, **PLAN) == 16384


def test_estimate_grows_with_the_model_and_shrinks_with_ranks():
    small = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    big = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=80)
    assert step_memory(small, 4, 1, 4096).per_token < step_memory(big, 2, 1, 4096).per_token
    assert step_memory(big, 2, 8, 4096).per_token < step_memory(big, 2, 1, 4096).per_token
    # 70B in bf16: ~0.5 MiB a token (16,384-token steps need ~8 GiB), dominated by the MLP and the prefix keys/values
    assert 0.3 < step_memory(big, 2, 1, 4096).per_token / 2**20 < 1.0
    windowed = CONFIGS["gemma2"]()  # soft-capped attention holds a [heads, 4096, 4096] fp32 score matrix
    assert step_memory(windowed, 4, 1, 4096).fixed >= 2 * 4 * 4096 * 4096 * 4


def test_engine_sizes_its_step_and_refuses_to_load(tmp_path):
    torch.manual_seed(20)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    plain = TorchRewardEngine(folder, device="cpu", dtype="fp32")
    weights = module_bytes(plain.trunk, plain.head.weight)
    engine = TorchRewardEngine(folder, device="cpu", dtype="fp32", memory_budget=weights + (8 << 20), max_tokens=512)
    assert 512 <= engine.max_step_tokens < 2048 and engine.max_step_tokens % 64 == 0
    with pytest.raises(ValueError, match=r"memory: one 4096-token conversation needs"):
        TorchRewardEngine(folder, device="cpu", dtype="fp32", memory_budget=weights + (1 << 20), max_tokens=4096)


def test_cuda_graphs_pool_holds_a_captured_steps_activations_only():
    """A captured step shares no prefix and attends in the varlen kernel: the pool is its rows' activations, without
    the shared-prefix keys/values or the explicit scores (`fixed`), which were counted a second time: Mistral's 6 GiB
    of scores became 13.7 GiB with graphs)."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    memory = step_memory(config, 2, 1, 4096)
    assert memory.prefix_kv == int(32 * 2 * 8 * 128 * 2 * 1.5) and memory.fixed == 0
    assert memory.with_graph_pool(4096) == StepMemory(memory.per_token, (memory.per_token - memory.prefix_kv) * 4096, memory.prefix_kv)
    windowed = StepMemory(per_token=1000, fixed=6 << 30, prefix_kv=400)
    assert windowed.with_graph_pool(4096).bytes(0) == (6 << 30) + 600 * 4096
