"""The `torch` runtime: a transformers trunk run over packed sequences, then the reward head.

Packed execution: the sequences of one step are concatenated into a single row with no
padding, so every linear layer runs once over exactly the real tokens; attention runs per
sequence (causal, within each sequence only), so its cost follows each sequence's own length.
The reward head (`heads`) is applied only to the final hidden states where scores are read
(the last token, or the end of every assistant turn): the full-vocabulary projection is never computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from batching import Step, plan_steps, score_all, shared_prefixes
from heads import load_reward_model
from invariance import make_batch_invariant

PACKED_ATTENTION = "packed_reward"  # no "sdpa" in the name: transformers would then demand SDPA support
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention applied to each packed sequence on its own ([1, heads, tokens, dim] in).

    A sequence whose shared prefix was computed earlier (`shared_prefix`) attends to that
    prefix's keys/values too, then causally to its own tokens. Sliding windows (Mistral,
    Gemma 2) and attention-logit soft-capping (Gemma 2) are applied as the model asks.
    """
    bounds, shared = PACKING.get()
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    pieces = []
    for segment, (start, end) in enumerate(pairwise(bounds)):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        prefix = shared.kv(module.layer_idx, segment) if shared is not None else None
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        pieces.append(_attend(q, k, v, scaling, window, softcap))
    output = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return output.transpose(1, 2).contiguous(), None


def _attend(q, k, v, scaling, window, softcap):
    """The last q.shape[2] positions of a causal sequence of k.shape[2] tokens attend to its keys."""
    gqa = q.shape[1] != k.shape[1]
    queries, keys = q.shape[2], k.shape[2]
    if not window and not softcap and queries == keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
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
# Where each packed sequence starts and which shared prefix it continues, set around each trunk
# call: not every architecture passes extra keyword arguments down to its attention (Nemotron).
PACKING: ContextVar[tuple[list[int], SharedPrefixes | None]] = ContextVar("packing")


@dataclass
class SharedPrefixes:
    """Keys/values of prefixes computed once, and which packed segment continues which prefix."""

    cache: DynamicCache  # all prefixes packed in one row: [1, kv_heads, prefix tokens, dim] per layer
    bounds: list[int]  # prefix p spans tokens bounds[p]:bounds[p + 1] of the cache
    owner: list[int]  # per segment: index of its prefix, or -1

    def kv(self, layer: int, segment: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        p = self.owner[segment]
        if p < 0:
            return None
        start, end = self.bounds[p], self.bounds[p + 1]
        entry = self.cache.layers[layer]
        return entry.keys[:, :, start:end], entry.values[:, :, start:end]


class TorchRewardEngine:
    """Scores token sequences with a transformers reward checkpoint (see `heads` for the layouts)."""

    supports_turns = True  # reads scores at any positions (every assistant turn's end)

    def __init__(
        self,
        checkpoint: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_step_tokens: int | None = None,
        min_shared_prefix: int = 64,
    ) -> None:
        """`auto` and None pick the defaults measured per device (README, "Precision and step size")."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        if dtype == "auto":  # fp32 keeps 1e-4 parity on CPUs; bf16 is what GPUs (and 70B checkpoints) run in
            dtype = "bf16" if on_gpu else "fp32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected auto or one of {sorted(DTYPES)}")
        # Small steps keep a CPU's activations in cache; a GPU wants large ones.
        self.max_step_tokens = max_step_tokens or (16384 if on_gpu else 2048)
        self.min_shared_prefix = min_shared_prefix  # 0 turns prefix reuse off
        trunk, head = load_reward_model(checkpoint, DTYPES[dtype], PACKED_ATTENTION)
        self.trunk = make_batch_invariant(trunk.to(self.device).eval())
        self.vocab_size = self.trunk.get_input_embeddings().num_embeddings
        head.weight = head.weight.to(self.device)
        head.bias = None if head.bias is None else head.bias.to(self.device)
        self.head = head

    def score(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Head outputs [P, N] at `positions` (see batching.score_all): [len(sequences), N] by default."""
        return score_all(self, sequences, positions)

    def read_positions(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """Where outputs are read: `positions` (default: each last token). A classifier with a pad
        token reads, as transformers does, at the last token that is not the pad token."""
        positions = [np.array([len(s) - 1]) for s in sequences] if positions is None else positions
        pad = self.head.pad_token
        if pad is None:
            return list(positions)
        return [np.array([_last_not(s[: p + 1], pad) for p in ps]) for s, ps in zip(sequences, positions, strict=True)]

    def plan(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> list[Step]:
        """Steps of the token budget, shortest first. A group sharing a prefix stays in one step
        (the prefix is computed once per step, so splitting the group would compute it again)
        and costs its prefix once plus each member's own suffix. A shared prefix always ends
        before a sequence's first read position, so every output is read in its own suffix."""
        groups = []
        if self.min_shared_prefix:
            heads = sequences if positions is None else [s[: p[0] + 1] for s, p in zip(sequences, positions, strict=True)]
            groups = shared_prefixes(heads, self.min_shared_prefix)
        grouped = {i for _, members in groups for i in members}
        units = [members for _, members in groups] + [[i] for i in range(len(sequences)) if i not in grouped]
        cost = [length + sum(len(sequences[i]) - length for i in members) for length, members in groups]
        cost += [len(sequences[unit[0]]) for unit in units[len(groups) :]]
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

    @torch.inference_mode()
    def score_step(
        self,
        sequences: list[np.ndarray],
        prefixes: Sequence[tuple[int, list[int]]] = (),
        positions: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """One packed forward; head outputs [P, N] at `positions` as in `score`. `prefixes` (from
        `plan`): (length, positions in `sequences`) of each group sharing a prefix (best-of-n);
        that prefix is computed once for the group."""
        owner, starts = [-1] * len(sequences), [0] * len(sequences)
        for p, (length, members) in enumerate(prefixes):
            for i in members:
                owner[i], starts[i] = p, length
        shared = None
        if prefixes:
            heads = [sequences[members[0]][:length] for length, members in prefixes]
            # No config: a config would give sliding-window layers a cache that keeps only the last
            # window of tokens, and the prefixes are packed in one row, sliced by their offsets.
            cache = DynamicCache()
            self._forward(heads, [0] * len(heads), [np.array([len(h) - 1]) for h in heads], cache=cache)
            shared = SharedPrefixes(cache=cache, bounds=_bounds([len(h) for h in heads]).tolist(), owner=owner)
        positions = self.read_positions(sequences) if positions is None else positions
        suffixes = [s[start:] for s, start in zip(sequences, starts, strict=True)]
        reads = [np.asarray(p) - start for p, start in zip(positions, starts, strict=True)]
        return self.head(self._forward(suffixes, starts, reads, shared=shared)).cpu().numpy()

    def _forward(
        self,
        sequences: list[np.ndarray],
        offsets: list[int],
        reads: list[np.ndarray],
        cache: DynamicCache | None = None,
        shared: SharedPrefixes | None = None,
    ) -> torch.Tensor:
        """Final hidden states at `reads` (indices into each sequence), all packed into one row."""
        lengths = [len(s) for s in sequences]
        bounds = _bounds(lengths)
        input_ids = torch.from_numpy(np.concatenate(sequences).astype(np.int64))[None].to(self.device)
        position_ids = torch.cat([torch.arange(o, o + n) for o, n in zip(offsets, lengths, strict=True)])[None].to(self.device)
        token = PACKING.set((bounds.tolist(), shared))
        try:
            hidden = self.trunk(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=cache is not None)
        finally:
            PACKING.reset(token)
        hidden = hidden.last_hidden_state[0]
        rows = np.concatenate([start + r for start, r in zip(bounds[:-1].tolist(), reads, strict=True)])
        return hidden[torch.from_numpy(rows).to(self.device)]


def _last_not(sequence: np.ndarray, token: int) -> int:
    kept = np.flatnonzero(np.asarray(sequence) != token)
    return int(kept[-1]) if len(kept) else 0  # transformers' argmax over an all-pad row


def _bounds(lengths: list[int]) -> torch.Tensor:
    bounds = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    bounds[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return bounds
