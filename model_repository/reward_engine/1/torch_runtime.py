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
from transformers import AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from batching import plan_steps

PACKED_ATTENTION = "packed_sdpa"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention applied to each packed sequence on its own ([1, heads, tokens, dim] in)."""
    bounds = kwargs["cu_seq_lens_q"].tolist()
    gqa = query.shape[1] != key.shape[1]
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True, scale=scaling, enable_gqa=gqa
        )
        for start, end in pairwise(bounds)
    ]
    output = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return output.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # packed_attention masks each sequence itself


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, _no_mask)


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

    def __init__(self, checkpoint: str, *, device: str = "cpu", dtype: str = "fp32", max_step_tokens: int = 16384) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        self.device = torch.device(device)
        self.max_step_tokens = max_step_tokens
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[dtype], attn_implementation=PACKED_ATTENTION)
        # -HF convention: the reward is the logit of token id 0, i.e. row 0 of lm_head.
        self.head = RewardHead(
            weight=model.get_output_embeddings().weight[:1].detach().clone().to(self.device), bias=None, names=["reward"]
        )
        self.trunk = model.get_decoder().to(self.device).eval()
        del model  # drops the full-vocabulary lm_head

    @torch.inference_mode()
    def score(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        """Rewards [len(sequences), N] for token-id sequences of any lengths."""
        rewards = np.empty((len(sequences), len(self.head.names)), dtype=np.float32)
        for step in plan_steps([len(s) for s in sequences], self.max_step_tokens):
            rewards[step] = self._score_packed([sequences[i] for i in step])
        return rewards

    def _score_packed(self, sequences: list[np.ndarray]) -> np.ndarray:
        lengths = torch.tensor([len(s) for s in sequences])
        bounds = torch.zeros(len(sequences) + 1, dtype=torch.int32)
        bounds[1:] = torch.cumsum(lengths, 0)
        input_ids = torch.from_numpy(np.concatenate(sequences).astype(np.int64))[None].to(self.device)
        position_ids = torch.cat([torch.arange(n) for n in lengths.tolist()])[None].to(self.device)
        hidden = self.trunk(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            cu_seq_lens_q=bounds,
            cu_seq_lens_k=bounds,
        ).last_hidden_state[0]
        last = hidden[(bounds[1:] - 1).to(self.device)]
        return self.head(last).cpu().numpy()
