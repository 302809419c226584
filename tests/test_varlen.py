"""The varlen attention path (`attention: varlen`, varlen.py): one kernel call per layer, wired right, on every family.

The FlashAttention kernel runs on CUDA only. Here it is replaced by a plain-torch kernel with the same
contract (packed rows, cu_seqlens, each segment's queries bottom-right aligned on its keys, grouped-query
heads), so that what the engine hands the kernel (bounds, prefixes' keys, the filler, max lengths) is
checked on a CPU against the per-sequence path; the kernel itself is checked on a GPU
(benchmarks/gpu_checks.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from reward_server import varlen
from reward_server.runtimes.torch_runtime import TorchRewardEngine
from tests.test_architectures import CONFIGS, _engine, _save, _sequences
from tests.test_prefix_cache import _cached_scores, _group

PARITY = 1e-5  # fp32: the same arithmetic in another order (one masked SDPA per segment vs is_causal)


class ReferenceFlash:
    """aten::_flash_attention_forward's varlen contract in plain torch; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[int], int, int]] = []

    def __call__(self, query, key, value, cu_q, cu_k, max_q, max_k, dropout, causal, debug_mask, scale=None, **options):
        assert causal and dropout == 0.0 and options.keys() <= {"num_splits"}
        cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
        self.calls.append((cu_q, cu_k, max_q, max_k))
        assert max_q >= 2 and max_q >= max(np.diff(cu_q)) and max_k == max(np.diff(cu_k))
        out = torch.empty_like(query)
        for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:], strict=False):
            q, k, v = (t.transpose(0, 1)[None] for t in (query[q0:q1], key[k0:k1], value[k0:k1]))
            rows = torch.arange(k1 - k0 - (q1 - q0), k1 - k0)[:, None]
            visible = torch.arange(k1 - k0)[None] <= rows
            out[q0:q1] = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)[0].transpose(0, 1)
        return out, None, None, None, None


@pytest.fixture
def kernel(monkeypatch) -> ReferenceFlash:
    reference = ReferenceFlash()
    monkeypatch.setattr(varlen, "FLASH", reference)
    monkeypatch.setattr(varlen, "available", lambda device, dtype: True)
    return reference


def _family(family: str, tmp_path, seed: int) -> str:
    torch.manual_seed(seed)
    return _save(AutoModelForCausalLM.from_config(CONFIGS[family]()), tmp_path)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_varlen_path_equals_the_per_sequence_path(family, kernel, tmp_path):
    """Alone, mixed, and as shared-prefix groups (the prompt's keys before each member's): the scores of the
    per-sequence path. Layers with a sliding window or soft-capping keep the per-sequence path."""
    folder = _family(family, tmp_path, 30)
    sequences = _sequences(30)
    loop = _engine(folder).score(sequences)
    engine = _engine(folder, min_shared_prefix=8, attention="varlen")
    assert engine.varlen
    got = engine.score(sequences)
    assert np.abs(got - loop).max() <= PARITY, f"{family}: {np.abs(got - loop).max():.2e}"
    if family in ("mistral", "gemma2"):  # windowed or soft-capped layers: the per-sequence path
        assert not kernel.calls
        return
    layers = engine.trunk.config.num_hidden_layers  # each forward: one call per layer, all of one batch
    assert kernel.calls and len(kernel.calls) % layers == 0
    for first in range(0, len(kernel.calls), layers):
        assert all(call == kernel.calls[first] for call in kernel.calls[first : first + layers])


def test_one_kernel_call_per_layer_whatever_the_number_of_sequences(kernel, tmp_path):
    folder = _family("llama", tmp_path, 31)
    engine = TorchRewardEngine(folder, device="cpu", dtype="fp32", min_shared_prefix=0, attention="varlen")
    sequences = [np.arange(n) % 900 for n in (5, 17, 40, 3, 90, 33, 61, 8)]
    for count in (1, 8):
        kernel.calls.clear()
        engine.score(sequences[:count])
        assert len(kernel.calls) == engine.trunk.config.num_hidden_layers
        cu_q = kernel.calls[0][0]
        lengths = sorted(len(s) for s in sequences[:count])  # shortest first, then the filler up to whole tiles
        assert np.diff(cu_q).tolist()[:count] == lengths and cu_q[-1] % engine.tile_rows == 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_varlen_path_continues_cached_prompts(family, kernel, tmp_path):
    """With the prefix cache: the cached blocks' keys go before each request's own (cu_k counts them), and the
    scores are those of the per-sequence path without a cache."""
    folder = _family(family, tmp_path, 32)
    _, sequences = _group(32)
    expected = _engine(folder).score(sequences)
    engine = _engine(folder, prefix_cache_tokens=1024, min_shared_prefix=8, attention="varlen")
    got = _cached_scores(engine, sequences)
    assert np.abs(got - expected).max() <= PARITY
    assert engine.prefix_cache.counters.hits >= 2 * 4
    continued = [call for call in kernel.calls if np.any(np.diff(call[1]) > np.diff(call[0]))]
    assert continued  # some segments attended to keys before their own tokens


def test_auto_takes_varlen_where_it_runs_unless_the_prefix_cache_is_on(kernel, tmp_path):
    folder = _family("llama", tmp_path, 35)
    assert _engine(folder).varlen  # the default: auto
    assert not _engine(folder, prefix_cache_tokens=1024).varlen  # the cache's bit-identity rests on the loop's tiles
    assert not _engine(folder, attention="loop").varlen


def test_auto_keeps_the_per_sequence_path_where_the_kernel_cannot_run(tmp_path):
    engine = _engine(_family("llama", tmp_path, 36))
    engine.score([np.arange(40) % 900])
    assert not engine.varlen


def test_unknown_attention_is_refused(tmp_path):
    with pytest.raises(ValueError, match="attention 'flash'"):
        _engine(_family("llama", tmp_path, 33), attention="flash")


def test_varlen_where_the_kernel_cannot_run_is_refused_at_load(tmp_path):
    with pytest.raises(ValueError, match="attention varlen needs FlashAttention on a CUDA GPU"):
        _engine(_family("llama", tmp_path, 34), attention="varlen")


def test_the_kernel_stays_off_where_it_cannot_run():
    assert not varlen.available(torch.device("cpu"), torch.bfloat16)
    assert varlen.fits(128, None, None) and not varlen.fits(128, 4096, None) and not varlen.fits(128, None, 50.0)
    assert not varlen.fits(100, None, None) and not varlen.fits(512, None, None)
