"""The `torch` runtime: a transformers trunk run over packed sequences, then the reward head.

Packed execution: the sequences of one step are concatenated into a single row with no
padding, so every linear layer runs once over exactly the real tokens; attention runs per
sequence (causal, within each sequence only), so its cost follows each sequence's own length.
Only the reward row(s) of the head are applied to the last token's final hidden state: the
full-vocabulary projection is never computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from batching import plan_steps, shared_prefixes

PACKED_ATTENTION = "packed_sdpa"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention applied to each packed sequence on its own ([1, heads, tokens, dim] in).

    A sequence whose shared prefix was computed earlier (`shared_prefix`) attends to that
    prefix's keys/values too, then causally to its own tokens.
    """
    bounds = kwargs["cu_seq_lens_q"].tolist()
    shared: SharedPrefixes | None = kwargs.get("shared_prefix")
    gqa = query.shape[1] != key.shape[1]
    pieces = []
    for segment, (start, end) in enumerate(pairwise(bounds)):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        prefix = shared.kv(module.layer_idx, segment) if shared is not None else None
        if prefix is None:
            pieces.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa))
            continue
        k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        visible = torch.ones(end - start, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - (end - start))
        pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling, enable_gqa=gqa))
    output = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return output.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # packed_attention masks each sequence itself


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, _no_mask)


@dataclass
class Step:
    """Sequences scored in one packed forward, and the groups among them that share a prefix."""

    indices: list[int]  # into the sequences given to `plan`
    prefixes: list[tuple[int, list[int]]]  # (prefix length, positions within `indices`) per group


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


@dataclass
class RewardHead:
    """A linear map hidden -> N reward outputs, read at the last token."""

    weight: torch.Tensor  # [N, hidden]
    bias: torch.Tensor | None  # [N]
    names: list[str]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        rewards = hidden.float() @ self.weight.float().T
        return rewards if self.bias is None else rewards + self.bias.float()


class TorchRewardEngine:
    """Scores token sequences with a transformers checkpoint in the -HF reward layout."""

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
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[dtype], attn_implementation=PACKED_ATTENTION)
        # -HF convention: the reward is the logit of token id 0, i.e. row 0 of lm_head.
        self.head = RewardHead(
            weight=model.get_output_embeddings().weight[:1].detach().clone().to(self.device), bias=None, names=["reward"]
        )
        self.trunk = model.get_decoder().to(self.device).eval()
        del model  # drops the full-vocabulary lm_head

    def score(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        """Rewards [len(sequences), N] for token-id sequences of any lengths."""
        rewards = np.empty((len(sequences), len(self.head.names)), dtype=np.float32)
        for step in self.plan(sequences):
            rewards[step.indices] = self.score_step([sequences[i] for i in step.indices], step.prefixes)
        return rewards

    def plan(self, sequences: Sequence[np.ndarray]) -> list[Step]:
        """Steps of the token budget, shortest first. A group sharing a prefix stays in one step
        (the prefix is computed once per step, so splitting the group would compute it again)
        and costs its prefix once plus each member's own suffix."""
        groups = shared_prefixes(sequences, self.min_shared_prefix) if self.min_shared_prefix else []
        grouped = {i for _, members in groups for i in members}
        units = [members for _, members in groups] + [[i] for i in range(len(sequences)) if i not in grouped]
        cost = [length + sum(len(sequences[i]) - length for i in members) for length, members in groups]
        cost += [len(sequences[unit[0]]) for unit in units[len(groups) :]]
        steps = []
        for step_units in plan_steps(cost, self.max_step_tokens):
            step = Step(indices=[], prefixes=[])
            for unit in step_units:
                if unit < len(groups):
                    positions = list(range(len(step.indices), len(step.indices) + len(units[unit])))
                    step.prefixes.append((groups[unit][0], positions))
                step.indices += units[unit]
            steps.append(step)
        return steps

    @torch.inference_mode()
    def score_step(self, sequences: list[np.ndarray], prefixes: Sequence[tuple[int, list[int]]] = ()) -> np.ndarray:
        """One packed forward. `prefixes` (from `plan`): (length, positions in `sequences`) of each
        group sharing a prefix (best-of-n); that prefix is computed once for the group."""
        owner, starts = [-1] * len(sequences), [0] * len(sequences)
        for p, (length, members) in enumerate(prefixes):
            for i in members:
                owner[i], starts[i] = p, length
        shared = None
        if prefixes:
            heads = [sequences[members[0]][:length] for length, members in prefixes]
            cache = DynamicCache(config=self.trunk.config)
            self._forward(heads, [0] * len(heads), cache=cache)
            shared = SharedPrefixes(cache=cache, bounds=_bounds([len(h) for h in heads]).tolist(), owner=owner)
        suffixes = [s[start:] for s, start in zip(sequences, starts, strict=True)]
        return self.head(self._forward(suffixes, starts, shared_prefix=shared)).cpu().numpy()

    def _forward(self, sequences: list[np.ndarray], offsets: list[int], **attention_kwargs) -> torch.Tensor:
        """Final hidden state at the last token of each sequence, all packed into one row."""
        lengths = [len(s) for s in sequences]
        bounds = _bounds(lengths)
        input_ids = torch.from_numpy(np.concatenate(sequences).astype(np.int64))[None].to(self.device)
        position_ids = torch.cat([torch.arange(o, o + n) for o, n in zip(offsets, lengths, strict=True)])[None].to(self.device)
        cache = attention_kwargs.pop("cache", None)
        hidden = self.trunk(
            input_ids=input_ids,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            cu_seq_lens_q=bounds,
            cu_seq_lens_k=bounds,
            **attention_kwargs,
        ).last_hidden_state[0]
        return hidden[(bounds[1:] - 1).to(self.device)]


def _bounds(lengths: list[int]) -> torch.Tensor:
    bounds = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    bounds[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return bounds
