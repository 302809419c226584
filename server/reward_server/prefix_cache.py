"""A prefix cache across requests: the keys/values of leading token blocks, kept after a step (LRU, bounded).

RLHF trainers send the n responses to one prompt as n separate requests; with this cache the prompt's
keys/values are computed once and the later requests compute only their own tokens.

Keys: a sequence is cut into blocks of BLOCK_TOKENS tokens from its first token. Block j's key hashes
block j-1's key together with block j's token ids (a chain), so one key names every token up to the end
of its block: two sequences share a cached block only when all their tokens up to there are equal.
Values: per block, the keys/values of every layer, one tensor [layers, 2, kv_heads, BLOCK_TOKENS,
head_dim] on the engine's device in the activation dtype (FP8 weights leave activations in bf16). With
tensor parallelism each rank holds its own cache of its own kv heads: every rank sees the same tokens in
the same order (the plan's `reserve` included), so all ranks key, hold, hit and evict identically.

Eviction: least recently used first; a sequence's blocks are touched from its last block to its first,
so the tail of a chain goes before its head (a block is useless once the blocks before it are gone).
Blocks a plan counted on (`reserve`, the engine's plan: a step is costed by the tokens it computes) are
held until the next plan (`release`): the steps before theirs may insert and evict, but not them, so a
step never computes more than its plan (and its memory plan) allowed. When only held blocks are left to
evict, the newest blocks are the ones dropped: the bound holds.

Bit-identical by construction: with the cache on, the engine runs attention in query tiles of
BLOCK_TOKENS aligned to each sequence's start, each tile one call over the keys up to its own end
(torch_runtime._attend_tiles), and shared prompts of a step end on a block boundary. A tile's call then
has the same shapes and the same inputs whether the blocks before it were computed in this step or
read from the cache, so a conversation scored alone, again, or after others sharing its prompt gives
the same bits (tested; linear layers are row-invariant by invariance.py). Against the engine without
the cache (one attention call per sequence) scores agree within 1e-4 in fp32 (tested per family).
Off by default (`prefix_cache_tokens` 0): the per-tile calls are unmeasured on a GPU, where one call
per tile per layer is many kernel launches, and the bound is taken from the step's memory plan.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

BLOCK_TOKENS = 64


def block_keys(tokens: np.ndarray, blocks: int) -> list[bytes]:
    """Chained keys of the first `blocks` whole blocks of `tokens`."""
    ids = np.ascontiguousarray(np.asarray(tokens)[: blocks * BLOCK_TOKENS], dtype=np.int64)
    keys, previous = [], b""
    for j in range(blocks):
        previous = hashlib.blake2b(previous + ids[j * BLOCK_TOKENS : (j + 1) * BLOCK_TOKENS].tobytes(), digest_size=16).digest()
        keys.append(previous)
    return keys


def kv_bytes_per_token(config, dtype: torch.dtype, tensor_parallel: int = 1) -> int:
    """Bytes of one token's keys/values over all layers, on one rank (its share of the kv heads, at least one)."""
    text = getattr(config, "text_config", config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = max(getattr(text, "num_key_value_heads", None) or text.num_attention_heads, 1)
    local = max(kv_heads // tensor_parallel, 1)
    return text.num_hidden_layers * 2 * local * head_dim * torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class CacheCounters:
    """Cumulative counts (blocks are BLOCK_TOKENS tokens), and the bytes held now."""

    hits: int = 0  # blocks looked up and found
    misses: int = 0  # blocks looked up and not found (the lookup stops at the first)
    evictions: int = 0
    bytes_held: int = 0
    block_tokens: int = BLOCK_TOKENS

    def since(self, earlier: CacheCounters) -> CacheCounters:
        """Counts of what happened after `earlier` (bytes_held stays the current value)."""
        return CacheCounters(self.hits - earlier.hits, self.misses - earlier.misses, self.evictions - earlier.evictions, self.bytes_held)


class PrefixCache:
    """Keys/values of whole leading blocks, at most `max_tokens // BLOCK_TOKENS` blocks."""

    def __init__(self, max_tokens: int, bytes_per_token: int) -> None:
        if max_tokens < BLOCK_TOKENS:
            raise ValueError(f"prefix cache of {max_tokens} tokens holds no block of {BLOCK_TOKENS} tokens")
        self.capacity = max_tokens // BLOCK_TOKENS
        self.max_bytes = self.capacity * BLOCK_TOKENS * bytes_per_token  # the bound a memory plan reserves
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.held: set[bytes] = set()  # reserved by the current plan: never evicted
        self.counters = CacheCounters()

    def reserve(self, tokens: np.ndarray, limit: int) -> int:
        """Tokens of the longest cached run of whole blocks from the first within tokens[:limit] (what a
        `lookup` would find now), held until `release`. Counts nothing: the step's lookup does."""
        keys = self._cached_run(block_keys(tokens, limit // BLOCK_TOKENS))
        self.held.update(keys)
        return len(keys) * BLOCK_TOKENS

    def cached(self, tokens: np.ndarray, limit: int) -> int:
        """What `reserve` would return, holding and counting nothing."""
        return len(self._cached_run(block_keys(tokens, limit // BLOCK_TOKENS))) * BLOCK_TOKENS

    def release(self) -> None:
        """Ends the holds of `reserve`: every block may be evicted again."""
        self.held.clear()

    def lookup(self, tokens: np.ndarray, limit: int) -> tuple[list[bytes], torch.Tensor | None]:
        """Keys of the whole blocks within tokens[:limit], and the cached keys/values of the longest run
        of them from the first ([layers, 2, kv_heads, run * BLOCK_TOKENS, head_dim]), None if none."""
        keys = block_keys(tokens, limit // BLOCK_TOKENS)
        found = len(self._cached_run(keys))
        self._touch(keys[:found])
        c = self.counters
        self.counters = CacheCounters(c.hits + found, c.misses + len(keys) - found, c.evictions, c.bytes_held)
        return keys, (torch.cat([self.blocks[k] for k in keys[:found]], dim=3) if found else None)

    def insert(self, keys: list[bytes], kv: torch.Tensor, first: int) -> None:
        """Store blocks first .. first + n - 1 of a chain (`keys`: all its keys from block 0) from `kv`,
        their keys/values [layers, 2, kv_heads, n * BLOCK_TOKENS, head_dim]."""
        blocks = kv.shape[3] // BLOCK_TOKENS
        added = 0
        for j in reversed(range(blocks)):  # tail first: it ends older than the head
            key = keys[first + j]
            if key not in self.blocks:
                block = kv[:, :, :, j * BLOCK_TOKENS : (j + 1) * BLOCK_TOKENS].clone()  # own storage: evicting frees it
                self.blocks[key] = block
                added += block.nbytes
        self._touch(keys[: first + blocks])
        over = max(len(self.blocks) - self.capacity, 0)  # held blocks are at most all the blocks held before: enough others
        victims = list(islice((key for key in self.blocks if key not in self.held), over))  # least recently used first
        for key in victims:
            added -= self.blocks.pop(key).nbytes
        evicted = len(victims)
        c = self.counters
        self.counters = CacheCounters(c.hits, c.misses, c.evictions + evicted, c.bytes_held + added)

    def _cached_run(self, keys: list[bytes]) -> list[bytes]:
        """The longest run of `keys` from the first that is cached."""
        found = 0
        while found < len(keys) and keys[found] in self.blocks:
            found += 1
        return keys[:found]

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)
