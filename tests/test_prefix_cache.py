"""The prefix cache across requests: keys, LRU bound, exactness on every trunk family, metrics, the server."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from reward_server.batching import run_steps
from reward_server.prefix_cache import BLOCK_TOKENS, CacheCounters, PrefixCache, block_keys, kv_bytes_per_token
from reward_server.runtimes import torch_runtime
from reward_server.runtimes.torch_runtime import TorchRewardEngine
from tests.live_server import metric
from tests.test_architectures import CONFIGS, TOLERANCE, VOCAB, _eager, _engine, _save

PER_TOKEN = 8  # bytes per token of the small caches below: one block of 64 tokens is [1, 2, 1, 64, 1] fp32 values


def _block(value: float, blocks: int = 1) -> torch.Tensor:
    return torch.full((1, 2, 1, blocks * BLOCK_TOKENS, 1), float(value))


def test_block_keys_name_every_token_before_them():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1000, 3 * BLOCK_TOKENS)
    b = a.copy()
    b[5] += 1  # only the first block differs: every later key differs too (chained)
    assert len(block_keys(a, 3)) == 3 and block_keys(a, 2) == block_keys(a, 3)[:2]
    assert not set(block_keys(a, 3)) & set(block_keys(b, 3))
    assert block_keys(a, 3) == block_keys(a.astype(np.int32), 3)


def test_lookup_returns_the_longest_cached_run_from_the_first_block():
    tokens = np.arange(4 * BLOCK_TOKENS)
    cache = PrefixCache(16 * BLOCK_TOKENS, PER_TOKEN)
    keys, found = cache.lookup(tokens, len(tokens))
    assert found is None and cache.counters.misses == 4
    cache.insert(keys, torch.cat([_block(0), _block(1), _block(2)], dim=3), 0)
    _, found = cache.lookup(tokens, 2 * BLOCK_TOKENS + 5)  # a limit inside block 2: blocks 0 and 1 only
    assert found.shape == (1, 2, 1, 2 * BLOCK_TOKENS, 1) and found[0, 0, 0, BLOCK_TOKENS:].eq(1).all()
    assert (cache.counters.hits, cache.counters.misses) == (2, 4)
    assert cache.counters.bytes_held == 3 * BLOCK_TOKENS * PER_TOKEN


def test_least_recently_used_goes_first_tail_before_head():
    cache = PrefixCache(3 * BLOCK_TOKENS, PER_TOKEN)
    old, new = np.arange(2 * BLOCK_TOKENS), np.arange(2 * BLOCK_TOKENS) + 5000
    cache.insert(block_keys(old, 2), _block(1, 2), 0)
    cache.insert(block_keys(new, 2), _block(2, 2), 0)  # 4 blocks > 3: the old chain's tail is evicted
    assert cache.counters.evictions == 1 and len(cache.blocks) == 3
    _, found = cache.lookup(old, len(old))
    assert found.shape[3] == BLOCK_TOKENS  # the old chain's head is still there
    assert cache.counters.bytes_held == 3 * BLOCK_TOKENS * PER_TOKEN <= cache.max_bytes


def test_blocks_a_plan_reserved_are_held_until_the_next_plan():
    """reserve: the cached run within a limit, counting nothing; held, the inserts after it evict other blocks
    (the newest, when only held ones are left: the bound holds); after release they go as any other."""
    cache = PrefixCache(2 * BLOCK_TOKENS, PER_TOKEN)
    old, new = np.arange(3 * BLOCK_TOKENS), np.arange(2 * BLOCK_TOKENS) + 5000
    cache.insert(block_keys(old, 2), _block(1, 2), 0)
    assert cache.reserve(old, 2 * BLOCK_TOKENS - 1) == BLOCK_TOKENS  # block 1 ends past the limit
    assert cache.reserve(old, len(old)) == 2 * BLOCK_TOKENS
    assert cache.counters == CacheCounters(bytes_held=2 * BLOCK_TOKENS * PER_TOKEN)
    cache.insert(block_keys(new, 2), _block(2, 2), 0)  # the old chain is held: the new blocks are dropped
    assert cache.counters.evictions == 2 and len(cache.blocks) == 2
    assert cache.lookup(old, len(old))[1].shape[3] == 2 * BLOCK_TOKENS
    cache.release()
    cache.insert(block_keys(new, 2), _block(2, 2), 0)
    assert cache.lookup(new, len(new))[1].shape[3] == 2 * BLOCK_TOKENS and cache.lookup(old, len(old))[1] is None
    assert cache.counters.bytes_held == 2 * BLOCK_TOKENS * PER_TOKEN


def test_the_bound_is_whole_blocks_of_every_layer():
    config = CONFIGS["llama"]()  # 2 layers, 2 kv heads of 16
    assert kv_bytes_per_token(config, torch.float32) == 2 * 2 * 2 * 16 * 4
    assert kv_bytes_per_token(config, torch.bfloat16, tensor_parallel=2) == 2 * 2 * 1 * 16 * 2
    assert PrefixCache(200, 100).max_bytes == 3 * BLOCK_TOKENS * 100
    with pytest.raises(ValueError, match="holds no block"):
        PrefixCache(BLOCK_TOKENS - 1, 100)


def _group(seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A 150-token prompt (two whole blocks, far beyond the sliding window of 16) and six responses."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, VOCAB - 1, 150)
    return prompt, [np.concatenate([prompt, rng.integers(0, VOCAB - 1, n)]) for n in (3, 10, 25, 60, 7, 40)]


def _cached_scores(engine: TorchRewardEngine, sequences: list[np.ndarray], positions=None) -> np.ndarray:
    """The first response alone, the next three one request each, the last two as one request (a shared-prefix
    group in one step that continues the cached prompt)."""
    positions = positions or [None] * len(sequences)
    pieces = [engine.score([s], None if p is None else [p]) for s, p in zip(sequences[:4], positions[:4], strict=True)]
    last = None if positions[4] is None else positions[4:]
    return np.concatenate([*pieces, engine.score(sequences[4:], last)])


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_cached_prompt_is_exact_on_every_causal_family(family, tmp_path):
    torch.manual_seed(11)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS[family]()), tmp_path)
    reference = _eager(AutoModelForCausalLM, folder)
    _, sequences = _group(11)
    with torch.inference_mode():
        expected = np.array([reference(torch.from_numpy(s)[None]).logits[0, -1, 0].item() for s in sequences])
    engine = _engine(folder, prefix_cache_tokens=1024, min_shared_prefix=8)
    got = _cached_scores(engine, sequences)[:, 0]
    assert np.abs(got - expected).max() <= TOLERANCE, f"{family}: {np.abs(got - expected).max():.2e}"
    assert engine.prefix_cache.counters.hits >= 2 * 4  # the later requests reused the prompt's two blocks


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_cached_prompt_is_exact_on_sequence_classifiers(family, tmp_path):
    config = CONFIGS[family]()
    config.num_labels = 2
    torch.manual_seed(12)
    folder = _save(AutoModelForSequenceClassification.from_config(config), tmp_path)
    reference = _eager(AutoModelForSequenceClassification, folder)
    _, sequences = _group(12)
    with torch.inference_mode():
        expected = np.stack([reference(torch.from_numpy(s)[None]).logits[0].numpy() for s in sequences])
    engine = _engine(folder, prefix_cache_tokens=1024)
    assert np.abs(_cached_scores(engine, sequences) - expected).max() <= TOLERANCE
    assert engine.prefix_cache.counters.hits > 0


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cached_or_not_the_same_bits(family, tmp_path):
    """With the cache on: responses sent one by one (the later ones continue the cached prompt), all in
    one step (a shared-prompt group), and each alone on a fresh engine give bit-identical scores."""
    torch.manual_seed(20)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS[family]()), tmp_path)
    _, sequences = _group(20)
    cached = _engine(folder, prefix_cache_tokens=1024)
    one_by_one = np.concatenate([cached.score([s]) for s in sequences])
    assert cached.prefix_cache.counters.hits >= 2 * (len(sequences) - 1)
    together = _engine(folder, prefix_cache_tokens=1024)
    assert together.plan(sequences)[0].prefixes[0][0] == 2 * BLOCK_TOKENS  # the 150-token prompt, cut to whole blocks
    assert np.array_equal(together.score(sequences), one_by_one)
    alone = np.concatenate([_engine(folder, prefix_cache_tokens=1024).score([s]) for s in sequences])
    assert np.array_equal(alone, one_by_one)


@pytest.mark.parametrize("cache", [0, 1024])
@pytest.mark.parametrize("budget", [1024, 256])
def test_a_shared_prompt_is_computed_beside_its_members_in_one_forward(budget, cache, monkeypatch, tmp_path):
    """A step's shared prompt is a segment of the step's one forward, its members attending to its keys at
    each layer (not a forward of its own first, whose fixed cost a GPU pays per forward); a group over the
    step budget (295 tokens against 256) keeps its prompt in a forward of its own, first, then its members in
    forwards within the budget (with the cache on, the prompt cut to 128 tokens, theirs are 277)."""
    torch.manual_seed(22)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    _, sequences = _group(22)
    engine = TorchRewardEngine(folder, device="cpu", dtype="fp32", max_step_tokens=budget, prefix_cache_tokens=cache)
    (step,) = engine.plan(sequences)
    assert step.prefixes and len(step.prefixes[0][1]) == len(sequences)
    forwards, forward = [], engine._forward
    monkeypatch.setattr(engine, "_forward", lambda *args: forwards.append([len(s) for s in args[0]]) or forward(*args))
    together = engine.score(sequences)
    prompt = step.prefixes[0][0]
    suffixes = sorted(len(s) - prompt for s in sequences)
    assert forwards[0][0] == prompt and len(forwards) == (1 if budget == 1024 else 3 if cache else 2)
    assert all(sum(lengths) <= budget for lengths in forwards[1:])
    members = forwards[0][1:] if len(forwards) == 1 else [n for lengths in forwards[1:] for n in lengths]  # after the prompt, or not
    assert sorted(members) == suffixes
    alone = np.concatenate([TorchRewardEngine(folder, device="cpu", dtype="fp32", prefix_cache_tokens=cache).score([s]) for s in sequences])
    if cache:  # the tiles make it the same bits (README, "Prefix cache across requests")
        assert np.array_equal(together, alone)
    assert np.abs(together - alone).max() <= TOLERANCE


def test_continued_prompts_attend_through_a_lower_right_causal_bias(monkeypatch, tmp_path):
    """A tile or a response that continues earlier keys is handed to SDPA as `causal_lower_right`, never as a
    boolean mask: CUDA's fused kernels take no mask with grouped-query heads, so a mask meant the math kernel."""
    torch.manual_seed(21)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    _, sequences = _group(21)
    masks = []

    def spy(q, k, v, attn_mask=None, **options):
        masks.append((attn_mask, q.shape[1] != k.shape[1], q.shape[2] < k.shape[2]))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **options)

    # the runtime's own calls only (CausalBias dispatches through torch's F.scaled_dot_product_attention)
    monkeypatch.setattr(torch_runtime, "F", SimpleNamespace(scaled_dot_product_attention=spy))
    cached = _engine(folder, prefix_cache_tokens=1024)
    _cached_scores(cached, sequences)  # 64-token tiles, cached prompts, one shared-prompt step
    assert cached.prefix_cache.counters.hits > 0
    assert any(gqa for _, gqa, _ in masks) and any(continued for *_, continued in masks)
    assert all(isinstance(mask, CausalBias) for mask, *_ in masks)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_reads_inside_the_prompt_are_computed_not_cached(family, tmp_path):
    """A read position inside the cached prompt: only whole blocks before it come from the cache."""
    torch.manual_seed(13)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS[family]()), tmp_path)
    reference = _eager(AutoModelForCausalLM, folder)
    _, sequences = _group(13)
    positions = [np.array([100, len(s) - 1]) if k % 2 else np.array([len(s) - 1]) for k, s in enumerate(sequences)]
    with torch.inference_mode():
        expected = np.concatenate(
            [reference(torch.from_numpy(s)[None]).logits[0, p, :1].numpy() for s, p in zip(sequences, positions, strict=True)]
        )
    engine = _engine(folder, prefix_cache_tokens=1024)
    assert np.abs(_cached_scores(engine, sequences, positions) - expected).max() <= TOLERANCE


def test_a_small_cache_evicts_and_stays_exact(tmp_path):
    """Two prompts through a cache of three blocks: evictions happen, bytes stay within the bound, scores exact."""
    torch.manual_seed(14)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    plain = _engine(folder, min_shared_prefix=0)
    engine = _engine(folder, prefix_cache_tokens=3 * BLOCK_TOKENS, min_shared_prefix=0)
    sequences = [s for seed in (14, 15) for s in _group(seed)[1][:3]]
    got = np.concatenate([engine.score([s]) for s in sequences + sequences[:2]])
    expected = plain.score(sequences + sequences[:2])
    assert np.abs(got - expected).max() <= TOLERANCE
    counters = engine.prefix_cache.counters
    assert counters.evictions > 0 and counters.hits > 0
    assert counters.bytes_held <= engine.prefix_cache.max_bytes == 3 * BLOCK_TOKENS * kv_bytes_per_token(CONFIGS["llama"](), torch.float32)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_tensor_parallel_ranks_each_cache_their_own_heads(family, tmp_path):
    """TP 2 (gloo): every rank keeps its own cache of its kv heads, keyed the same way; the responses sent
    one by one equal one device without a cache (fp32: only the order of the row-parallel sums differs).
    The engine driving the ranks reports rank 0's counters, as one device's engine would (the metrics)."""
    torch.manual_seed(18)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS[family]()), tmp_path)
    _, sequences = _group(18)
    expected = _engine(folder, min_shared_prefix=0).score(sequences)
    one_device = _engine(folder, prefix_cache_tokens=1024)
    _cached_scores(one_device, sequences)
    engine = _engine(folder, tensor_parallel=2, prefix_cache_tokens=1024)
    try:
        assert engine.cache_counters == CacheCounters()
        got = _cached_scores(engine, sequences)
        counters = engine.cache_counters
        (step,) = run_steps(engine, sequences[:1], engine.read_positions(sequences[:1]))  # seen before: all its blocks hit
    finally:
        engine.close()
    assert np.abs(got - expected).max() <= TOLERANCE
    local = one_device.cache_counters
    assert (counters.hits, counters.misses, counters.evictions) == (local.hits, local.misses, local.evictions) and counters.hits > 0
    assert counters.bytes_held == local.bytes_held // 2  # each rank holds half the kv heads
    assert step.cache.hits == len(sequences[0]) // BLOCK_TOKENS and step.reused == step.cache.hits * BLOCK_TOKENS


def test_fp8_with_the_cache_equals_fp8_without(tmp_path):
    """FP8 weights (emulated on CPU) leave activations in bf16: the cache holds bf16 keys/values and the
    cached path stays within bf16 rounding of the uncached one (2e-2 on scores of magnitude ~1)."""
    torch.manual_seed(19)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    _, sequences = _group(19)
    expected = TorchRewardEngine(folder, device="cpu", dtype="fp8", min_shared_prefix=0).score(sequences)
    engine = TorchRewardEngine(folder, device="cpu", dtype="fp8", prefix_cache_tokens=1024)
    assert engine.prefix_cache.max_bytes == 16 * BLOCK_TOKENS * kv_bytes_per_token(CONFIGS["llama"](), torch.bfloat16)
    got = _cached_scores(engine, sequences)
    assert next(iter(engine.prefix_cache.blocks.values())).dtype == torch.bfloat16
    assert np.abs(got - expected).max() <= 2e-2 * max(1.0, np.abs(expected).max())
    assert engine.prefix_cache.counters.hits > 0


def test_step_results_count_the_tokens_the_cache_saved(tmp_path):
    """run_steps reports the step's cache counters; `reused` adds cached tokens to the shared-prompt ones."""
    torch.manual_seed(16)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    engine = _engine(folder, prefix_cache_tokens=1024)
    _, sequences = _group(16)
    reads = engine.read_positions(sequences)
    first = list(run_steps(engine, sequences[:1], reads[:1]))
    assert first[0].cache.hits == 0 and first[0].reused == 0
    second = list(run_steps(engine, sequences[1:3], reads[1:3]))  # a group of two over a cached prompt
    (step,) = second
    group_prefix = step.prefixes[0][0]
    assert step.cache.hits == 2 and step.reused == 2 * BLOCK_TOKENS + group_prefix
    assert step.cache.bytes_held == engine.prefix_cache.counters.bytes_held > 0


def test_an_uncached_shared_prompt_counts_each_block_missed_once(tmp_path):
    """A group's prompt is looked up when its step is made; what is not found there is not looked up
    again when the step computes it (its blocks were counted as missed twice: 3 for a 2-block prompt)."""
    torch.manual_seed(17)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    engine = _engine(folder, prefix_cache_tokens=1024)
    rng = np.random.default_rng(17)
    prompt = rng.integers(0, VOCAB - 1, 2 * BLOCK_TOKENS + 2)
    sequences = [np.concatenate([prompt, rng.integers(0, VOCAB - 1, n)]) for n in (5, 6, 7)]
    (step,) = list(run_steps(engine, sequences, engine.read_positions(sequences)))
    assert step.prefixes and (step.cache.hits, step.cache.misses) == (0, 2)
    (again,) = list(run_steps(engine, sequences, engine.read_positions(sequences)))
    assert (again.cache.hits, again.cache.misses) == (2, 0)  # a step's counters are its own


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_a_plan_costs_cached_blocks_at_their_share_of_a_step(tensor_parallel, tmp_path):
    """Later responses to a cached prompt cost the plan the tokens they compute, plus their cached blocks'
    keys/values at their share of a token's memory (1/8 here: 16 tokens for the prompt's 128): five of 157-210
    tokens take two steps of 256 instead of five, and give the bits each gives alone. Under tensor
    parallelism (gloo) the engine that plans holds no cache and asks its ranks': the same plan."""
    torch.manual_seed(23)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    _, sequences = _group(23)
    later = sequences[1:]
    engine = _engine(folder, prefix_cache_tokens=1024, min_shared_prefix=0, tensor_parallel=tensor_parallel)
    try:
        assert engine.cached_token_cost == pytest.approx(0.125 if tensor_parallel == 1 else 1 / 14)  # a rank's share
        assert len(engine.plan(later)) == len(later)  # nothing cached yet: every token costs one
        engine.score(sequences[:1])
        assert [len(step.indices) for step in engine.plan(later)] == [4, 1]  # costs 45, 48, 63, 78 | 98 (TP 2: 6 less each)
        got = engine.score(later)
        counters = engine.cache_counters
    finally:
        engine.close()
    alone = np.concatenate([_engine(folder, prefix_cache_tokens=1024, min_shared_prefix=0).score([s]) for s in later])
    assert counters.hits == 2 * len(later)
    if tensor_parallel == 1:
        assert np.array_equal(got, alone)
    else:  # fp32: only the order of the row-parallel sums differs
        assert np.abs(got - alone).max() <= TOLERANCE


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_the_blocks_a_step_was_planned_on_outlive_the_steps_before_it(tensor_parallel, tmp_path):
    """A cache of three blocks holding a prompt's two: a call whose first step inserts two new blocks and whose
    second continues the prompt. The prompt's blocks are held for the plan, so the first step's insert evicts
    one of its own new blocks, and the second step reads both, computing only what its plan counted. Under
    tensor parallelism every rank holds the blocks the plan counted on in its own cache."""
    torch.manual_seed(24)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    prompt, _ = _group(24)
    rng = np.random.default_rng(24)
    response = np.concatenate([prompt, rng.integers(0, VOCAB - 1, 110)])  # 260 tokens: 260 - 128 + 16 = 148
    other = rng.integers(0, VOCAB - 1, 2 * BLOCK_TOKENS)  # 128: first, and alone (128 + 148 > 256)
    engine = _engine(folder, prefix_cache_tokens=3 * BLOCK_TOKENS, min_shared_prefix=0, tensor_parallel=tensor_parallel)
    try:
        engine.score([prompt])
        steps = list(run_steps(engine, [response, other], engine.read_positions([response, other])))
    finally:
        engine.close()
    assert [step.indices for step in steps] == [[1], [0]]
    assert steps[1].cache.hits == 2 and steps[0].cache.evictions == 1  # one of its own two blocks
    block_bytes = BLOCK_TOKENS * kv_bytes_per_token(CONFIGS["llama"](), torch.float32, tensor_parallel)
    assert steps[1].cache.bytes_held == 3 * block_bytes
    alone = _engine(folder, prefix_cache_tokens=1024).score([response])
    if tensor_parallel == 1:
        assert np.array_equal(steps[1].outputs[0], alone)
    else:
        assert np.abs(steps[1].outputs[0] - alone).max() <= TOLERANCE


def test_the_server_reuses_a_prompt_across_requests(tmp_path, checkpoint, tokenizer, reference_reward):
    """Two requests sharing a 2,000-token prompt, one after the other: the second computes only its own
    tokens, as the tokens-reused counter on :8002 shows, and its score equals the reference."""
    from reward_client import RewardClient
    from reward_server import metrics
    from tests.live_server import start_server, stop_server

    rng = np.random.default_rng(17)
    words = [w[1:] for w in sorted(tokenizer.get_vocab()) if re.fullmatch(r"Ġ[a-z]{4,8}", w)]
    prompt = [{"role": "user", "content": " ".join(rng.choice(words, 2000))}]
    conversations = [[*prompt, {"role": "assistant", "content": " ".join(rng.choice(words, n))}] for n in (120, 250)]
    env = {"REWARD_CHECKPOINT": str(checkpoint), "REWARD_PREFIX_CACHE_TOKENS": "4096"}
    server = start_server(tmp_path / "server.log", env=env)
    try:
        with RewardClient(server.grpc_url) as client:
            first = client.score(conversations[0])
            reused_after_first = _counter(server, metrics.PREFIX_REUSED)
            second = client.score(conversations[1])
        reused = _counter(server, metrics.PREFIX_REUSED) - reused_after_first
        hits = _counter(server, metrics.CACHE_HITS)
    finally:
        stop_server(server)
    assert reused_after_first == 0
    assert reused >= 1984 and hits >= 1984 // BLOCK_TOKENS  # the whole blocks of the 2,000-token prompt
    for conversation, score in zip(conversations, (first, second), strict=True):
        assert abs(float(score) - reference_reward(conversation)) <= TOLERANCE


def _counter(server, name: str) -> float:
    value = metric(server.metrics(), name)
    assert value is not None, f"{name} not exported"
    return value
