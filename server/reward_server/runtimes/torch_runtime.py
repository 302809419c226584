"""The `torch` runtime: a transformers trunk run over packed sequences, then the reward head.

Packed execution: the sequences of one step are concatenated into a single row with no
padding, so every linear layer runs once over exactly the real tokens; attention is causal within
each sequence only, so its cost follows each sequence's own length: on a GPU one variable-length
FlashAttention call per layer (varlen.py), elsewhere (or with the prefix cache on) one SDPA call per sequence.
The reward head (`heads`) is applied only to the final hidden states where scores are read
(the last token, or the end of every assistant turn): the full-vocabulary projection is never computed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from reward_server import step_graphs, varlen
from reward_server.batching import Step, plan_steps, score_all, shared_prefixes
from reward_server.fp8 import quantize_trunk
from reward_server.fused import stack_siblings
from reward_server.heads import load_reward_model
from reward_server.host_memory import keep_freed_memory
from reward_server.invariance import CPU_TILE_ROWS, TILE_ROWS, make_batch_invariant, settle_products, whole_tiles
from reward_server.memory import SLACK, module_bytes, plan_step_tokens, step_memory
from reward_server.model_checks import check_trunk
from reward_server.norms import fuse_rms_norms
from reward_server.parallel import RankGroup, rank_device
from reward_server.prefix_cache import BLOCK_TOKENS, CacheCounters, PrefixCache, block_keys, kv_bytes_per_token

PACKED_ATTENTION = "packed_reward"  # no "sdpa" in the name: transformers would then demand SDPA support
# SDPA's kernels for the per-sequence path: not cuDNN's, which builds an execution plan for every shape and
# stride it meets, and a sequence's view in a packed step has strides set by the step's total rows, so a server
# (whose steps never repeat) meets new ones at almost every step; FlashAttention and the memory-efficient kernel
# take shapes and strides as arguments. (One H200, 2026-11-27, runs of the same day: on conversations of unseen
# lengths the engine scored 11,897 tokens/s through cuDNN, 29,138 through FlashAttention's varlen kernel; the
# server's short mix ran at 0.51x the engine's through cuDNN, 0.69x through varlen.)
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# fp8: loaded in bf16, then the decoder layers' linear weights quantised (fp8.py); the rest computes in bf16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention applied to each packed sequence on its own ([1, heads, tokens, dim] in).

    A sequence whose shared prefix was computed earlier (`shared_prefix`) attends to that
    prefix's keys/values too, then causally to its own tokens. Sliding windows (Mistral,
    Gemma 2) and attention-logit soft-capping (Gemma 2) are applied as the model asks.
    """
    packing = PACKING.get()
    bounds, shared, tile = packing.bounds, packing.shared, packing.tile
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if packing.varlen is not None and varlen.fits(query.shape[-1], window, softcap):
        keys, values = _packed_keys(module.layer_idx, key, value, bounds, shared)
        return varlen.attend(query[0].transpose(0, 1), keys, values, packing.varlen, scaling)[None], None
    if not bounds:  # a CUDA graph's capture (step_graphs.py): its bounds are on the device only
        raise RuntimeError(f"layer {module.layer_idx} (a sliding window or soft-capping) cannot run in the varlen kernel")
    pieces = []
    for segment, (start, end) in enumerate(pairwise(bounds)):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        prefix = shared.kv(module.layer_idx, segment, key, value, bounds) if shared is not None else None
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        if shared is not None:
            shared.capture(module.layer_idx, segment, k, v)
        pieces.append(_attend_tiles(q, k, v, scaling, window, softcap, tile) if tile else _attend(q, k, v, scaling, window, softcap))
    output = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return output.transpose(1, 2).contiguous(), None


def _packed_keys(layer: int, key, value, bounds: list[int], shared: SharedPrefixes | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's keys and values [tokens, kv_heads, dim] as the varlen kernel takes them: each segment's
    prefix (if any) before its own tokens; the kept ranges copied out as `packed_attention` does."""
    keys, values = key[0].transpose(0, 1), value[0].transpose(0, 1)  # views of the projections' rows
    if shared is None:
        return keys, values
    prefixes = [shared.kv(layer, segment, key, value, bounds) for segment in range(len(bounds) - 1)]
    if any(p is not None for p in prefixes):
        pieces = []
        for prefix, (start, end) in zip(prefixes, pairwise(bounds), strict=True):
            if prefix is not None:
                pieces.append((prefix[0][0].transpose(0, 1), prefix[1][0].transpose(0, 1)))
            pieces.append((keys[start:end], values[start:end]))
        keys, values = (torch.cat(side) for side in zip(*pieces, strict=True))
    start = 0
    for segment, (prefix, (low, high)) in enumerate(zip(prefixes, pairwise(bounds), strict=True)):
        end = start + high - low + (0 if prefix is None else prefix[0].shape[2])
        shared.capture(layer, segment, keys[start:end].transpose(0, 1)[None], values[start:end].transpose(0, 1)[None])
        start = end
    return keys, values


def _attend_tiles(q, k, v, scaling, window, softcap, tile):
    """`_attend` in query tiles aligned to every `tile` tokens of the sequence, each tile attending to the
    keys up to its own end: one call per tile, its shapes set by its position alone, so a tile computes
    the same bits whether the tokens before it ran in this step or came from the prefix cache."""
    first = k.shape[2] - q.shape[2]  # the sequence position of the first query
    pieces, start = [], first
    while start < k.shape[2]:
        end = min((start // tile + 1) * tile, k.shape[2])
        pieces.append(_attend(q[:, :, start - first : end - first], k[:, :, :end], v[:, :, :end], scaling, window, softcap))
        start = end
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def _attend(q, k, v, scaling, window, softcap):
    """The last q.shape[2] positions of a causal sequence of k.shape[2] tokens attend to its keys."""
    gqa = q.shape[1] != k.shape[1]
    queries, keys = q.shape[2], k.shape[2]
    if not window and not softcap:
        # causal_lower_right, not a boolean mask: SDPA's CUDA kernels take no mask with grouped-query heads, so
        # a mask sends them to the math kernel (on one H200 a continued prompt then cost more than recomputing
        # it); FlashAttention computes the lower-right causal case itself. On a CPU: the same mask, the same bits.
        bias = causal_lower_right(queries, keys)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scaling, enable_gqa=gqa)
    rows = torch.arange(keys - queries, keys, device=q.device)[:, None]
    cols = torch.arange(keys, device=q.device)[None]
    visible = (cols <= rows) & ((rows - cols < window) if window else True)
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling, enable_gqa=gqa)
    # SDPA cannot soft-cap; the same arithmetic as the model's eager attention.
    if gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(2, 3) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def _no_mask(*args, **kwargs):
    return None  # packed_attention masks each sequence itself


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, _no_mask)


@dataclass
class Packing:
    """Where each packed sequence starts and which shared prefix it continues, set around each trunk call:
    not every architecture passes extra keyword arguments down to its attention (Nemotron)."""

    bounds: list[int]
    shared: SharedPrefixes | None
    tile: int  # the per-sequence path's attention tile (0: one call per sequence); see `_attend_tiles`
    varlen: varlen.VarlenBatch | None  # where the varlen kernel runs (varlen.py): the bounds on the device


PACKING: ContextVar[Packing] = ContextVar("packing")


@dataclass
class SharedPrefixes:
    """Per packed segment: the keys/values of the tokens before it (the prefix cache's, or those of another
    segment of the same forward: a shared prompt computed beside its members), and which of its keys/values
    to copy out for later use."""

    # [layers, 2, kv_heads, tokens before the segment, head_dim]; or the index of the segment it continues
    # (that segment's keys/values at each layer, after that segment's own `before`); or None
    before: list[torch.Tensor | int | None]
    keep: list[tuple[int, int]]  # token range (from the sequence's first token) of keys/values to copy out
    layers: int
    kept: list[torch.Tensor | None] = field(default_factory=list)  # what was copied out: [layers, 2, kv_heads, range, head_dim]

    def kv(
        self, layer: int, segment: int, key: torch.Tensor, value: torch.Tensor, bounds: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The keys/values [1, kv_heads, tokens, dim] before `segment`'s own at `layer`, whose packed keys
        and values of this forward are `key`, `value` [1, kv_heads, tokens, dim], segments at `bounds`."""
        before = self.before[segment] if segment < len(self.before) else None  # past the list: the filler (_forward)
        if before is None:
            return None
        if not isinstance(before, int):
            return before[layer, 0][None], before[layer, 1][None]
        start, end = bounds[before], bounds[before + 1]
        own = key[:, :, start:end], value[:, :, start:end]
        earlier = self.kv(layer, before, key, value, bounds)
        return own if earlier is None else (torch.cat([earlier[0], own[0]], dim=2), torch.cat([earlier[1], own[1]], dim=2))

    def capture(self, layer: int, segment: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy this layer's keys/values [1, kv_heads, tokens, dim] (the prefix's included) of the kept range."""
        start, end = self.keep[segment] if segment < len(self.keep) else (0, 0)
        if end <= start:
            return
        if not self.kept:
            self.kept = [None] * len(self.keep)
        if self.kept[segment] is None:
            self.kept[segment] = keys.new_empty((self.layers, 2, keys.shape[1], end - start, keys.shape[3]))
        self.kept[segment][layer, 0] = keys[0, :, start:end]
        self.kept[segment][layer, 1] = values[0, :, start:end]


class TorchRewardEngine:
    """A `RewardEngine` (runtimes/__init__.py) on a transformers reward checkpoint (see `heads` for the layouts)."""

    supports_turns = True  # reads scores at any positions (every assistant turn's end)

    def __init__(
        self,
        checkpoint: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_step_tokens: int | None = None,
        min_shared_prefix: int = 64,
        tensor_parallel: int = 1,
        memory_budget: int | None = None,
        max_tokens: int = 4096,
        exit_on_rank_failure: bool = False,
        rank: int | None = None,
        prefix_cache_tokens: int = 0,
        tile_rows: int | None = None,
        first_device: int = 0,
        threads: int | None = None,
        fp8_bf16_layers: int = 0,
        attention: str = "auto",
        cuda_graphs: bool = False,
    ) -> None:
        """`auto` and None pick the defaults measured per device (README, "Precision and step size").
        tensor_parallel > 1: the model runs in that many worker processes (parallel.py), `rank` being
        set in each of them; memory_budget and max_tokens: memory.py. `first_device`: with device auto
        or cuda, the index of this engine's first GPU (engine instance k of several: k * tensor_parallel,
        instances.py); `threads`: CPU threads of each rank (None: torch's default, or shared by the ranks);
        `fp8_bf16_layers`: with dtype fp8, the first decoder layers left in bf16 (fp8.py); `attention`: loop (one
        SDPA call per sequence), varlen (one FlashAttention call per layer on a GPU, varlen.py) or auto (varlen
        where it runs and the prefix cache is off, whose bit-identity cached or not rests on the loop's tiles);
        `cuda_graphs`: steps without shared prefixes replayed from CUDA graphs (step_graphs.py)."""
        if attention not in ("auto", "loop", "varlen"):
            raise ValueError(f"attention {attention!r}: expected auto, loop or varlen")
        if cuda_graphs and tensor_parallel > 1:
            raise ValueError("cuda_graphs needs tensor_parallel 1 (the ranks' sums are not captured)")
        self.min_shared_prefix = min_shared_prefix  # 0 turns prefix reuse off
        self.ranks = None
        self.prefix_cache: PrefixCache | None = None  # across requests; each rank holds its own
        self._rank_counters: CacheCounters | None = None  # rank 0's, as of its last step (tensor parallel)
        self.device_wait: float | None = None  # of the last step (RewardEngine.device_wait; rank 0's under tensor parallel)
        # With the cache, attention runs in tiles of its blocks and shared prompts end on a block boundary:
        # cached or not, every tile is the same call (bit-identical by construction, _attend_tiles).
        self.attention_tile = BLOCK_TOKENS if prefix_cache_tokens else 0
        if tensor_parallel > 1 and rank is None:  # the engine that drives the ranks holds no weights
            if device in ("auto", "cuda") and 0 < torch.cuda.device_count() < tensor_parallel:
                raise ValueError(f"tensor_parallel {tensor_parallel} needs as many GPUs; this process sees {torch.cuda.device_count()}")
            options = dict(checkpoint=checkpoint, device=device, dtype=dtype, max_step_tokens=max_step_tokens)
            options.update(min_shared_prefix=min_shared_prefix, memory_budget=memory_budget, max_tokens=max_tokens)
            options.update(prefix_cache_tokens=prefix_cache_tokens, tile_rows=tile_rows, first_device=first_device, threads=threads)
            options.update(fp8_bf16_layers=fp8_bf16_layers, attention=attention)
            self.ranks = RankGroup(tensor_parallel, options, exit_on_failure=exit_on_rank_failure)
            info = self.ranks.info[0]
            self.vocab_size, self.spec, self.pad_token = info["vocab_size"], info["spec"], info["pad_token"]
            self.max_step_tokens = min(i["max_step_tokens"] for i in self.ranks.info)
            self.cached_token_cost = info["cached_token_cost"]  # alike on every rank
            self._rank_counters = CacheCounters() if prefix_cache_tokens else None
            return
        if first_device or device in ("auto", "cuda"):
            device = rank_device(device, first_device)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()  # a step's activations stay mapped for the next one (host_memory.py)
            if threads:
                torch.set_num_threads(threads)
        on_gpu = self.device.type == "cuda"
        if dtype == "auto":  # fp32 keeps 1e-4 parity on CPUs; bf16 is what GPUs (and 70B checkpoints) run in
            dtype = "bf16" if on_gpu else "fp32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected auto or one of {sorted(DTYPES)}")
        # Before the checkpoint is read: a configuration that cannot run is refused at once.
        runs = varlen.available(self.device, DTYPES[dtype])
        self.varlen = attention == "varlen" or (attention == "auto" and runs and not prefix_cache_tokens)
        if self.varlen and not runs:
            raise ValueError(
                f"attention varlen needs FlashAttention on a CUDA GPU (sm80+) and dtype bf16, fp16 or fp8; here: {device} {dtype}"
            )
        if cuda_graphs and not self.varlen:
            raise ValueError(
                "cuda_graphs needs attention varlen: a CUDA GPU (sm80+) and dtype bf16, fp16 or fp8 (auto picks the loop "
                "where the prefix cache is on)"
            )
        shard = (rank, tensor_parallel) if tensor_parallel > 1 else None
        trunk, head = load_reward_model(checkpoint, DTYPES[dtype], PACKED_ATTENTION, shard)
        check_trunk(trunk, max_tokens, fp8=dtype == "fp8")
        stack_siblings(trunk)  # q/k/v and gate/up: one product each (fused.py)
        fuse_rms_norms(trunk)  # one kernel per norm where torch has one (norms.py)
        coarse_tile = tile_rows or TILE_ROWS  # auto: a CPU's products at CPU_TILE_ROWS where one call is proven (invariance.py)
        self.tile_rows = tile_rows = tile_rows or (CPU_TILE_ROWS if self.device.type == "cpu" else TILE_ROWS)
        if dtype == "fp8":  # layer by layer onto the device: the bf16 weights never all sit there
            quantize_trunk(trunk, self.device, tile_rows, fp8_bf16_layers)
        self.trunk = make_batch_invariant(trunk.to(self.device).eval(), tile_rows)
        self.vocab_size = self.trunk.get_input_embeddings().num_embeddings
        head.weight = head.weight.to(self.device)
        head.bias = None if head.bias is None else head.bias.to(self.device)
        self.head = head
        self.spec, self.pad_token = head.spec, head.pad_token
        kv_per_token = kv_bytes_per_token(trunk.config, DTYPES[dtype], tensor_parallel)
        if prefix_cache_tokens:  # its bound is reserved in the memory plan, like the weights
            self.prefix_cache = PrefixCache(prefix_cache_tokens, kv_per_token)
        reserved = self.prefix_cache.max_bytes if self.prefix_cache is not None else 0
        # Small steps keep a CPU's activations in cache; a GPU wants large ones; both within memory.
        memory = step_memory(trunk.config, DTYPES[dtype].itemsize, tensor_parallel, max_tokens, fp8=dtype == "fp8")
        # A cached token is not computed, but a step holds its keys/values: its share of a computed token's memory (reserve)
        self.cached_token_cost = kv_per_token * SLACK / memory.per_token
        if cuda_graphs:  # the graphs' memory pool holds a captured step's activations, beside the allocator's for the others
            memory = memory.with_graph_pool(step_graphs.most_rows(tile_rows))
        self.max_step_tokens = plan_step_tokens(
            memory,
            weights=module_bytes(self.trunk, head.weight) + reserved,
            budget=memory_budget,
            free=torch.cuda.mem_get_info(self.device)[0] - reserved if on_gpu else None,
            max_tokens=max_tokens,
            max_step_tokens=max_step_tokens,
            default=16384 if on_gpu else 2048,
            tile=tile_rows,
        )
        # How each layer shape's products are made: one call or one bmm where proven, else one call per tile
        self.products = settle_products(self.trunk, max(self.max_step_tokens, max_tokens), coarse_tile)
        self.graphs = None
        if cuda_graphs:
            graphed = lambda ids, positions, batch: self._trunk(ids, positions, Packing([], None, 0, batch))  # noqa: E731
            rows = min(whole_tiles(max(self.max_step_tokens, max_tokens), tile_rows), step_graphs.most_rows(tile_rows))
            output = torch.empty((rows, trunk.config.hidden_size), dtype=self.trunk.get_input_embeddings().weight.dtype, device=self.device)
            self.graphs = step_graphs.StepGraphs(graphed, output, max(max_tokens, tile_rows), tile_rows)

    @property
    def cache_counters(self) -> CacheCounters | None:
        """The prefix cache's counters (under tensor parallelism rank 0's), None without a cache."""
        return self.prefix_cache.counters if self.prefix_cache is not None else self._rank_counters

    def close(self) -> None:
        """Ends the tensor-parallel ranks (nothing to do on one device)."""
        if self.ranks is not None:
            self.ranks.close()

    def score(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Head outputs [P, N] at `positions` (see batching.score_all): [len(sequences), N] by default."""
        return score_all(self, sequences, positions)

    def read_positions(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """Where outputs are read: `positions` (default: each last token). A classifier with a pad
        token reads, as transformers does, at the last token that is not the pad token."""
        positions = [np.array([len(s) - 1]) for s in sequences] if positions is None else positions
        pad = self.pad_token
        if pad is None:
            return list(positions)
        return [np.array([_last_not(s[: p + 1], pad) for p in ps]) for s, ps in zip(sequences, positions, strict=True)]

    def plan(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> list[Step]:
        """Steps of the token budget, shortest first. A group sharing a prefix stays in one step
        (the prefix is computed once per step, so splitting the group would compute it again)
        and costs its prefix once plus each member's own suffix. A shared prefix always ends
        before a sequence's first read position, so every output is read in its own suffix.
        With the prefix cache, leading blocks it holds cost only their keys/values' share of the
        step's memory, and stay there until the next plan (`reserve`); a sequence whose cached blocks reach
        past its group's prompt leaves the group (a member continues the prompt, not its own cached blocks)."""
        firsts = [len(s) - 1 for s in sequences] if positions is None else [int(p[0]) for p in positions]
        groups = []
        if self.min_shared_prefix:
            leading = [s[: first + 1] for s, first in zip(sequences, firsts, strict=True)]
            groups = shared_prefixes(leading, self.min_shared_prefix)
            if self.attention_tile:
                groups = [(n // self.attention_tile * self.attention_tile, m) for n, m in groups if n >= self.attention_tile]
            if self.prefix_cache is not None:  # a sequence the cache holds beyond its group's prompt continues its own blocks
                cached = {i: self.prefix_cache.cached(sequences[i], firsts[i]) for _, m in groups for i in m}
                groups = [(n, kept) for n, m in groups if len(kept := [i for i in m if cached[i] <= n]) > 1]
        grouped = {i for _, members in groups for i in members}
        units = [members for _, members in groups] + [[i] for i in range(len(sequences)) if i not in grouped]
        # A unit's leading tokens, which the cache may hold (up to where score_step looks them up), and its own.
        leads = [(sequences[m[0]][:n], n) for n, m in groups] + [(sequences[u[0]], firsts[u[0]]) for u in units[len(groups) :]]
        own = [sum(len(sequences[i]) - n for i in m) for n, m in groups] + [0] * (len(units) - len(groups))
        cached = self.reserve(leads)
        cost = [len(t) - c + math.ceil(c * self.cached_token_cost) + o for (t, _), c, o in zip(leads, cached, own, strict=True)]
        steps = []
        for step_units in plan_steps(cost, self.max_step_tokens):
            step = Step(indices=[], prefixes=[])
            for unit in step_units:
                if unit < len(groups):
                    members = list(range(len(step.indices), len(step.indices) + len(units[unit])))
                    step.prefixes.append((groups[unit][0], members))
                step.indices += units[unit]
            steps.append(step)
        return steps

    def reserve(self, leads: Sequence[tuple[np.ndarray, int]]) -> list[int]:
        """Tokens of each (tokens, limit)'s cached leading blocks within tokens[:limit], as score_step will
        look them up, held in the cache until the next call (a plan's: PrefixCache.reserve); 0 without a
        cache. A cached token is read, not computed, but its keys/values are held in the step: the plan
        counts it as `cached_token_cost` of a computed token. Under tensor parallelism the ranks' caches
        are alike (prefix_cache.py): every rank holds, rank 0 answers."""
        if self.ranks is not None and self._rank_counters is not None:  # ranks with a cache
            cached, _, _ = self.ranks.call("reserve", leads)
            return cached
        if self.prefix_cache is None:
            return [0] * len(leads)
        self.prefix_cache.release()  # the last plan's steps have run
        return [self.prefix_cache.reserve(tokens, limit) for tokens, limit in leads]

    @torch.inference_mode()
    def score_step(
        self,
        sequences: list[np.ndarray],
        prefixes: Sequence[tuple[int, list[int]]] = (),
        positions: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """One packed forward; head outputs [P, N] at `positions` as in `score`. `prefixes` (from
        `plan`): (length, positions in `sequences`) of each group sharing a prefix (best-of-n);
        that prefix is computed once for the group, as a segment of the same forward whose keys/values
        the members attend to at each layer (a group over `max_step_tokens`, alone in its step: in a
        forward of its own first, then its members in forwards within the budget, _pass_within_budget).
        With the prefix cache on, leading whole blocks
        found there are not computed, and the whole blocks computed are stored (prefix_cache.py)."""
        if self.ranks is not None:  # every rank runs this same step; rank 0 answers
            outputs, self._rank_counters, self.device_wait = self.ranks.call("score_step", sequences, prefixes, positions)
            return outputs
        positions = self.read_positions(sequences) if positions is None else positions
        before: list[torch.Tensor | int | None] = [None] * len(sequences)
        prompts: list[np.ndarray] = []  # computed in this forward, before the sequences, each read once
        prompt_before: list[torch.Tensor | None] = []
        cache = self.prefix_cache
        for length, members in prefixes:  # a group's prompt: from the cache if whole there, else a segment of this forward
            prompt = sequences[members[0]][:length]
            kv = None if cache is None else cache.lookup(prompt, length)[1]
            if kv is None or kv.shape[3] < length:
                prompts.append(prompt)
                prompt_before.append(kv)  # its cached leading blocks, if any
                kv = len(prompts) - 1  # the members continue that segment (the prompts go first)
            for i in members:
                before[i] = kv
        reads = [np.array([len(p) - 1]) for p in prompts] + list(positions)
        tokens = sum(map(len, prompts)) + sum(map(len, sequences)) - sum(length * len(members) for length, members in prefixes)
        alone = len(prefixes) == 1 and len(prefixes[0][1]) == len(sequences)  # the plan's step of a group over the budget
        if alone and tokens > self.max_step_tokens:  # (a step the plan filled counting cached tokens cheap stays one forward)
            if prompts:  # its prompt in a forward of its own first
                _, kept = self._pass(prompts, reads[: len(prompts)], prompt_before, whole=True, looked_up=len(prompts))
                before = [kept[b] if isinstance(b, int) else b for b in before]
            hidden = self._pass_within_budget(sequences, list(positions), before)
        else:
            hidden, _ = self._pass([*prompts, *sequences], reads, [*prompt_before, *before], looked_up=len(prompts))
            hidden = hidden[len(prompts) :]  # the prompts' reads dropped
        outputs = self.head(hidden)
        launched = time.perf_counter()  # on a GPU the work is queued: the copy below waits for it to finish
        scores = outputs.cpu().numpy()
        self.device_wait = time.perf_counter() - launched
        return scores

    def _pass_within_budget(self, sequences: list[np.ndarray], reads: list[np.ndarray], before: list[torch.Tensor | None]) -> torch.Tensor:
        """`_pass`'s hidden states of sequences continuing the keys/values `before` (a group's prompt), in forwards
        of at most `max_step_tokens` computed tokens each (a longer sequence alone): a group's members are not
        split over steps (each step would compute the prompt again), but their forwards stay within the
        memory plan. A row does not depend on the others of its forward: the same bits as one forward."""
        computed = [len(s) - (0 if kv is None else kv.shape[3]) for s, kv in zip(sequences, before, strict=True)]
        rows: list[torch.Tensor | None] = [None] * len(sequences)
        for chunk in plan_steps(computed, self.max_step_tokens):
            hidden, _ = self._pass([sequences[i] for i in chunk], [reads[i] for i in chunk], [before[i] for i in chunk])
            for i, read in zip(chunk, torch.split(hidden, [len(reads[i]) for i in chunk]), strict=True):
                rows[i] = read
        return torch.cat(rows)

    def _pass(
        self,
        sequences: list[np.ndarray],
        reads: Sequence[np.ndarray],
        before: list[torch.Tensor | int | None],
        whole: bool = False,
        looked_up: int = 0,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Final hidden states at `reads` of the packed `sequences`, each continuing the keys/values
        `before[i]` of its leading tokens (or the whole of an earlier sequence i of this pass, when an int);
        where None, the prefix cache's longest run of leading blocks that ends by the first read, if any.
        The whole blocks this pass computes go into the cache. `whole`: also return each sequence's
        keys/values from its first token. The first `looked_up` sequences were looked up in the cache already
        (score_step's shared prompts): a None there is not looked up again (nor counted twice)."""
        cache = self.prefix_cache
        if cache is not None:
            before = [
                cache.lookup(s, int(r[0]))[1] if kv is None and i >= looked_up else kv
                for i, (s, r, kv) in enumerate(zip(sequences, reads, before, strict=True))
            ]
        starts = [0 if kv is None else len(sequences[kv]) if isinstance(kv, int) else kv.shape[3] for kv in before]
        stored = [start // BLOCK_TOKENS * BLOCK_TOKENS for start in starts]  # blocks below: in the cache already
        ends = [len(s) // BLOCK_TOKENS * BLOCK_TOKENS for s in sequences]
        if whole:
            keep = [(0, len(s)) for s in sequences]
        else:
            keep = [(a, b) if cache is not None else (0, 0) for a, b in zip(stored, ends, strict=True)]
        shared = None
        if any(kv is not None for kv in before) or any(b > a for a, b in keep):
            shared = SharedPrefixes(before=before, keep=keep, layers=self.trunk.config.num_hidden_layers)
        suffixes = [s[start:] for s, start in zip(sequences, starts, strict=True)]
        hidden = self._forward(suffixes, starts, [np.asarray(r) - start for r, start in zip(reads, starts, strict=True)], shared)
        kept = shared.kept if shared is not None and shared.kept else [None] * len(sequences)
        if cache is not None:
            for s, kv, (first, _), low, high in zip(sequences, kept, keep, stored, ends, strict=True):
                if high > low:
                    cache.insert(block_keys(s, high // BLOCK_TOKENS), kv[:, :, :, low - first : high - first], low // BLOCK_TOKENS)
        return hidden, kept

    def _forward(
        self, sequences: list[np.ndarray], offsets: list[int], reads: list[np.ndarray], shared: SharedPrefixes | None = None
    ) -> torch.Tensor:
        """Final hidden states at `reads` (indices into each sequence), all packed into one row.

        The row is filled up to whole tiles of the linear layers by one more sequence, never read, so that
        they take the packed rows as they are instead of copying them into zero-padded tiles: a row of a
        matrix product does not depend on the other rows of its tile, so the scores are the same bits."""
        filler = -sum(len(s) for s in sequences) % self.tile_rows
        if filler:  # a segment past `shared`'s lists: nothing before it, nothing kept of it
            sequences, offsets = [*sequences, np.zeros(filler, np.int64)], [*offsets, 0]
        lengths = [len(s) for s in sequences]
        bounds = _bounds(lengths)
        input_ids = torch.from_numpy(np.concatenate(sequences).astype(np.int64))
        position_ids = torch.cat([torch.arange(o, o + n) for o, n in zip(offsets, lengths, strict=True)])
        # Before the forward is launched: a copy to a GPU waits for the work queued before it.
        rows = np.concatenate([start + r for start, r in zip(bounds[: len(reads)].tolist(), reads, strict=True)])
        rows = torch.from_numpy(rows).to(self.device)
        hidden = self.graphs.run(input_ids, position_ids, lengths) if self.graphs is not None and shared is None else None
        if hidden is None:
            batch = varlen.VarlenBatch.of(lengths, offsets, self.device) if self.varlen else None
            packing = Packing(bounds.tolist(), shared, self.attention_tile, batch)
            hidden = self._trunk(input_ids[None].to(self.device), position_ids[None].to(self.device), packing)
        return hidden[rows]

    def _trunk(self, input_ids: torch.Tensor, position_ids: torch.Tensor, packing: Packing) -> torch.Tensor:
        """The trunk's final hidden states [rows, hidden] for input_ids, position_ids [1, rows] packed as `packing` says."""
        token = PACKING.set(packing)
        try:
            with sdpa_kernel(SDPA_BACKENDS):
                return self.trunk(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state[0]
        finally:
            PACKING.reset(token)


def _last_not(sequence: np.ndarray, token: int) -> int:
    kept = np.flatnonzero(np.asarray(sequence) != token)
    return int(kept[-1]) if len(kept) else 0  # transformers' argmax over an all-pad row


def _bounds(lengths: list[int]) -> torch.Tensor:
    bounds = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    bounds[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return bounds
