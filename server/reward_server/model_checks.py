"""What the packed engine refuses of a transformers trunk at load, where serving it would give other scores than the
model's own, silently:

- rotary scalings whose frequencies follow the longest sequence of a forward (dynamic NTK, longrope), once
  sequences can be longer than the length where they start to: in a packed step that is the step's longest
  sequence, so a conversation's score would depend on its batchmates (and on the steps before: transformers
  keeps the grown frequencies);
- attention sinks (gpt-oss's learned `sinks`, passed to attention as `s_aux`): the packed attention does not
  add them;
- dtype fp8 on a mixture of experts whose expert weights are 3-D tensors (transformers 5's experts), which
  fp8.py, swapping nn.Linear layers, would leave in bf16: most of the model's weights.
"""

from __future__ import annotations

from torch import nn

GROWING_ROTARY = ("dynamic", "longrope")


def check_trunk(trunk: nn.Module, max_tokens: int, fp8: bool) -> None:
    """ValueError naming what the engine cannot compute as the model does."""
    check_rotary(trunk, max_tokens)
    sinks = [name for name, _ in trunk.named_parameters() if name.rsplit(".", 1)[-1] in ("sinks", "s_aux")]
    if sinks:
        raise ValueError(f"attention sinks ({sinks[0]}): the packed attention does not compute them")
    experts = [(name, tuple(p.shape)) for name, p in trunk.named_parameters() if p.ndim > 2 and "expert" in name]
    if fp8 and experts:
        name, shape = experts[0]
        raise ValueError(
            f"dtype fp8 quantizes nn.Linear layers; {name} holds {shape[0]} experts' weights in one {shape} tensor, "
            "which would stay bf16: serve this model in bf16"
        )


def check_rotary(trunk: nn.Module, max_tokens: int) -> None:
    config = trunk.config
    for module in trunk.modules():
        kinds = getattr(module, "rope_type", None)
        if not hasattr(module, "original_max_seq_len") or kinds is None:
            continue
        for layer_type, kind in kinds.items() if isinstance(kinds, dict) else [(None, kinds)]:
            if not any(growing in kind for growing in GROWING_ROTARY):
                continue
            parameters = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
            start = parameters.get("original_max_position_embeddings") if kind == "longrope" else None
            start = start or module.original_max_seq_len
            if max_tokens > start:
                raise ValueError(
                    f"rotary scaling {kind!r} changes its frequencies with the longest sequence of a forward past "
                    f"{start} tokens: a conversation's score would depend on its batch; set max_tokens to {start} or less"
                )
