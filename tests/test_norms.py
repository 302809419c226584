"""RMSNorm as one F.rms_norm call (norms.py): transformers' arithmetic, every norm swapped, one call each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from reward_server.norms import FusedRMSNorm, fuse_rms_norms
from reward_server.runtimes import torch_runtime
from tests.test_architectures import CONFIGS, _engine, _save, _sequences


def _norms(family: str, dtype: torch.dtype):
    """transformers' norm of that family in `dtype`, its weight far from its initial value, and its fused twin."""
    torch.manual_seed(50)
    norm = LlamaRMSNorm(256, eps=1e-5) if family == "llama" else Gemma2RMSNorm(256, eps=1e-6)
    norm.weight.data = torch.randn(256) * 0.3 + (1.0 if family == "llama" else 0.0)
    holder = torch.nn.Sequential(norm.to(dtype))
    fuse_rms_norms(holder)
    assert isinstance(holder[0], FusedRMSNorm)
    return norm, holder[0]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@torch.inference_mode()
def test_fp32_gives_transformers_bits_and_bf16_is_no_less_accurate(family):
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(52)) * 3
    norm, fused = _norms(family, torch.float32)
    assert torch.equal(fused(x), norm(x))  # CPU: torch's composite kernel does transformers' operations
    norm, fused = _norms(family, torch.bfloat16)
    x = x.bfloat16()
    exact = norm.double()(x.double())  # the bf16 weights, in float64
    theirs, ours = norm.to(torch.bfloat16)(x), fused(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.all((ours.double() - theirs.double()).abs() <= theirs.double().abs() * 2**-7)  # one rounding, not two: 1 ulp at most
    assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_rms_norm_is_one_call_and_the_scores_stay(family, monkeypatch, tmp_path):
    torch.manual_seed(51)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS[family]()), tmp_path)
    sequences = _sequences(51)
    engine = _engine(folder)
    fused = [m for m in engine.trunk.modules() if isinstance(m, FusedRMSNorm)]
    layers = engine.trunk.config.num_hidden_layers
    norms_per_layer = {"gemma2": 4, "nemotron": 0}.get(family, 2)  # Gemma 2: pre and post norms; Nemotron: LayerNorm
    assert len(fused) == layers * norms_per_layer + (family != "nemotron")  # and the final norm
    with torch.profiler.profile() as profile:
        got = engine.score(sequences[:3])
    calls = sum(e.count for e in profile.key_averages() if e.key == "aten::rms_norm")
    steps = len(engine.plan(sequences[:3]))
    assert calls == len(fused) * steps
    monkeypatch.setattr(torch_runtime, "fuse_rms_norms", lambda trunk: trunk)
    plain = _engine(folder)
    assert not any(isinstance(m, FusedRMSNorm) for m in plain.trunk.modules())
    assert np.array_equal(got, plain.score(sequences[:3]))  # fp32 on a CPU: the same bits
