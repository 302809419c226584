"""Reward heads: which linear map turns the trunk's last hidden state into named scores.

A checkpoint is a transformers folder, optionally with a head description beside it:

    reward_head.json          {"attributes": ["helpfulness", ...], "reward": {"index": 0}}
                              or "reward": {"weights": [w_0, ..., w_N-1]} (the reward is their weighted sum);
                              optional "bias": [b_0, ..., b_N-1] added to the outputs (a head folded
                              into a bias-free lm_head keeps its bias here)
    reward_head.safetensors   "weight" [N, hidden] and optionally "bias" [N]: a separate head

Which head is used:
- `*ForSequenceClassification`: its `score` layer (raw outputs, no activation) read where
  transformers reads it (the last token that is not `pad_token_id`); names from reward_head.json,
  else from `id2label` ("reward" for one unnamed output).
- a causal LM with reward_head.safetensors: that head on the trunk (NeMo-Aligner's `rm_head`).
- a causal LM without it: rows 0..N-1 of `lm_head` (the -HF convention, N = 1 unless
  reward_head.json names more), with its bias, the model's logit scale and its final logit
  soft-capping, checked at load against the LM's own logits (check_lm_rows). Only those rows
  are kept: the full-vocabulary projection is never computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.modeling_outputs import MoeModelOutputWithPast

from reward_server.head_spec import HeadSpec, default_names, head_bias, read_head_spec, read_separate_head
from reward_server.invariance import tile_calls
from reward_server.parallel import decoder_layers, shard_trunk
from reward_server.rank_loading import load_rank_model


@dataclass
class RewardHead:
    """A linear map hidden -> N named outputs (the torch runtime applies it itself)."""

    weight: torch.Tensor  # [N, hidden]
    bias: torch.Tensor | None  # [N]
    spec: HeadSpec
    softcap: float | None = None  # final logit soft-capping of the LM this head was cut from
    pad_token: int | None = None  # a classifier reads at the last token that is not this one

    def __post_init__(self) -> None:
        n = len(self.names)
        if self.weight.ndim != 2 or self.weight.shape[0] != n:
            raise ValueError(f"reward head: weight {tuple(self.weight.shape)} does not have {n} rows (one per attribute)")
        if self.bias is not None and tuple(self.bias.shape) != (n,):
            raise ValueError(f"reward head: bias {tuple(self.bias.shape)} is not [{n}]")

    @property
    def names(self) -> list[str]:
        return self.spec.names

    def reward(self, outputs: np.ndarray) -> np.ndarray:
        return self.spec.reward(outputs)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, hidden] -> [M, N] outputs, in fp32."""
        weight = self.weight.float()
        outputs = tile_calls(lambda rows: F.linear(rows, weight), hidden.float())  # a few tiles: one call shape each
        if self.softcap:
            outputs = torch.tanh(outputs / self.softcap) * self.softcap
        return outputs if self.bias is None else outputs + self.bias.float()


def load_reward_model(
    checkpoint: str, dtype: torch.dtype, attn_implementation: str, shard: tuple[int, int] | None = None
) -> tuple[torch.nn.Module, RewardHead]:
    """The transformers trunk (no LM head) and the reward head of a checkpoint folder; `shard` (rank,
    tensor_parallel): the trunk holds only that rank's part of each decoder layer (parallel.py), read
    from the checkpoint alone where it can be (rank_loading.py)."""
    folder = Path(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = load_rank_model(auto, folder, config, dtype, attn_implementation, *shard) if shard else None
    if model is None:
        model = auto.from_pretrained(checkpoint, dtype=dtype, attn_implementation=attn_implementation)
        if shard:
            shard_trunk(model.base_model, *shard)
    try:
        decoder_layers(model.base_model)
    except ValueError as exc:
        raise ValueError(f"{checkpoint}: {exc}") from None
    softcap = pad_token = None
    if classifier:
        weight, bias = model.score.weight, model.score.bias
        spec = read_head_spec(folder, _label_names(config))
        pad_token = config.get_text_config().pad_token_id
    elif (separate := read_separate_head(folder)) is not None:
        weight, bias = separate
        spec = read_head_spec(folder, default_names(weight.shape[0]))
    else:  # -HF convention: the reward rows are the first rows of lm_head, as the LM computes its logits
        spec = read_head_spec(folder, ["reward"])
        weight, bias, softcap = _lm_rows(model, config, len(spec.names))
        check_lm_rows(model, RewardHead(weight, bias, spec, softcap), checkpoint)
    bias = head_bias(folder, spec, bias)
    hidden_size = model.base_model.config.hidden_size
    if weight.ndim != 2 or weight.shape[1] != hidden_size:
        raise ValueError(f"{checkpoint}: reward head weight {tuple(weight.shape)} does not take the trunk's hidden size {hidden_size}")
    head = RewardHead(
        weight=weight.detach().clone(),
        bias=None if bias is None else bias.detach().clone(),
        spec=spec,
        softcap=softcap,
        pad_token=pad_token,
    )
    trunk = model.base_model
    del model  # drops the full-vocabulary lm_head of a causal LM
    return trunk, head


def _lm_rows(model, config, rows: int) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """Weight, bias and soft-capping of the first `rows` logits of a causal LM: lm_head's rows and bias, with
    the scale some families apply to their logits folded in (Cohere's logit_scale, Granite's logits_scaling)."""
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight[:rows], None if lm_head.bias is None else lm_head.bias[:rows]
    scale = getattr(config, "logit_scale", None) or 1.0
    scale /= getattr(config, "logits_scaling", None) or 1.0
    if scale != 1.0:  # in fp32, where the head computes (RewardHead)
        weight, bias = weight.float() * scale, None if bias is None else bias.float() * scale
    return weight, bias, getattr(config, "final_logit_softcapping", None)


@torch.inference_mode()
def check_lm_rows(model, head: RewardHead, checkpoint: str) -> None:
    """The head equals the LM's own first logits on a probe hidden state: the LM's forward runs with its trunk
    stood in for (one vocabulary projection, whatever the model's size), so a family that treats its logits
    in a way `_lm_rows` does not know is refused at load instead of served with other scores."""
    trunk = model.base_model
    hidden = torch.randn((1, 1, trunk.config.hidden_size), generator=torch.Generator().manual_seed(0))
    hidden = hidden.to(model.get_output_embeddings().weight)
    # a mixture of experts' LM reads router_logits too (None: no auxiliary loss)
    trunk.forward = lambda *args, **kwargs: MoeModelOutputWithPast(last_hidden_state=hidden)
    try:
        logits = model(input_ids=torch.zeros((1, 1), dtype=torch.long), logits_to_keep=1).logits[0, -1, : len(head.names)].float()
    finally:
        del trunk.forward
    ours = head(hidden[0])[0]
    # fp32: the same sums up to order; bf16/fp16: the LM rounds its logits to 8 or 11 bits of mantissa
    tolerance = 1e-4 if hidden.dtype == torch.float32 else 2e-2
    if not torch.allclose(ours, logits, rtol=tolerance, atol=tolerance):
        raise ValueError(
            f"{checkpoint}: {type(model).__name__}'s logits are not lm_head's rows as this server reads them ({ours.tolist()} "
            f"against {logits.tolist()} on a probe): the architecture treats its logits in a way the server does not know; "
            "give the head as reward_head.safetensors (README, checkpoints)"
        )


def _label_names(config) -> list[str]:
    labels = [config.id2label[i] for i in range(config.num_labels)]
    if all(re.fullmatch(r"LABEL_\d+", label) for label in labels):  # transformers' placeholders
        return default_names(len(labels))
    return labels
