"""q/k/v and gate/up stacked into one product each (fused.py): the same scores, one product per group."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from reward_server import fp8
from reward_server.fused import SharedProduct
from reward_server.runtimes import torch_runtime
from tests.test_architectures import CONFIGS, _engine, _save, _sequences


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_one_product_per_group_and_the_scores_of_the_separate_projections(family, monkeypatch, tmp_path):
    torch.manual_seed(40)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    folder = _save(model, tmp_path)
    sequences = _sequences(40)
    engine = _engine(folder)
    layers = engine.trunk.config.num_hidden_layers
    shared = [m for m in engine.trunk.modules() if isinstance(m, SharedProduct)]
    gated = family != "nemotron"  # Nemotron's MLP has no gate: its up projection stays alone
    assert len(shared) == layers * (2 if gated else 1)
    attention = engine.trunk.layers[0].self_attn
    q = model.base_model.layers[0].self_attn
    assert torch.equal(attention.qkv_proj.linear.weight, torch.cat([q.q_proj.weight, q.k_proj.weight, q.v_proj.weight]))
    if family == "qwen2":  # q/k/v with biases: stacked with them
        assert torch.equal(attention.qkv_proj.linear.bias, torch.cat([q.q_proj.bias, q.k_proj.bias, q.v_proj.bias]))
    calls, forwards, forward = [], [], engine._forward
    for module in shared:
        module.linear.register_forward_hook(lambda *_: calls.append(1))
    monkeypatch.setattr(engine, "_forward", lambda *args: forwards.append(1) or forward(*args))
    got = engine.score(sequences)
    assert forwards and len(calls) == len(shared) * len(forwards)  # each group's product once a forward, not once a sibling
    assert all(module.made.output is None and module.made.input is None for module in shared)  # nothing held after a step
    monkeypatch.setattr(torch_runtime, "stack_siblings", lambda trunk: trunk)
    separate = _engine(folder)
    assert not any(isinstance(m, SharedProduct) for m in separate.trunk.modules())
    assert np.abs(got - separate.score(sequences)).max() <= 1e-5


def test_fp8_quantises_each_stacked_input_once(monkeypatch, tmp_path):
    """Under FP8 a layer's input is quantised once for q/k/v and once for gate/up: 4 quantisations a layer
    (q/k/v, o, gate/up, down) in a one-tile step, not 7."""
    torch.manual_seed(41)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    engine = torch_runtime.TorchRewardEngine(folder, device="cpu", dtype="fp8", max_step_tokens=256)
    quantised = []
    real = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda rows: quantised.append(rows.shape) or real(rows))
    engine.score([np.arange(40) % 500])
    assert len(quantised) == 4 * engine.trunk.config.num_hidden_layers
