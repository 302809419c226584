"""Memory planning at load: weights + one step's activations (+ its prefix caches) against the budget.

The budget is `memory_budget` (bytes, for this rank's weights and activations) when set; else, on a
GPU, the memory free once the weights are loaded, less RESERVE (the CUDA context, the allocator's
fragmentation); on a CPU without `memory_budget` nothing is planned. The estimate is per token of a
step at the widest point of one decoder layer (the layers run one after another, so one layer's
activations are live at a time), plus the keys/values of every layer for tokens that are a shared
prefix (at most all of a step's tokens), times SLACK for temporaries the estimate does not name.
A step's leading tokens read from the prefix cache are not computed, but their keys/values are held in
the step: the engine's plan counts each as that share of a computed token (TorchRewardEngine.reserve).
Attention that cannot use the fused kernel (sliding windows, soft-capping) also holds one
sequence's [heads, tokens, tokens] scores in fp32; the longest sequence is `max_tokens`.

A prefix group stays in one step even beyond `max_step_tokens` (TorchRewardEngine.plan), but not in one
forward: its prompt (at most `max_tokens`) runs first, then its members in forwards of at most
`max_step_tokens` tokens, the prompt's keys/values of every layer held meanwhile (shared-prefix tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reward_server.invariance import whole_tiles

SLACK = 1.5
RESERVE = 0.1  # of the free GPU memory


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one step: `fixed` + `per_token` * tokens."""

    per_token: int
    fixed: int
    prefix_kv: int = 0  # of per_token, the keys/values a shared prefix holds

    def bytes(self, tokens: int) -> int:
        return self.fixed + self.per_token * tokens

    def with_graph_pool(self, rows: int) -> StepMemory:
        """Beside the steps run from Python, CUDA graphs' pool holding a captured step of `rows` rows (step_graphs.py):
        its activations alone (a captured step shares no prefix, and attends in the varlen kernel: no `fixed` scores)."""
        return StepMemory(self.per_token, self.fixed + (self.per_token - self.prefix_kv) * rows, self.prefix_kv)


def step_memory(config, element_bytes: int, world: int, max_tokens: int, fp8: bool = False) -> StepMemory:
    """Activation bytes of one step of this model on one of `world` ranks."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads // world
    kv_heads = max((getattr(config, "num_key_value_heads", None) or config.num_attention_heads) // world, 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inter = config.intermediate_size // world
    # residual + normed input + layer output, q/k/v + attention output, gate/up/activated MLP, fp32 norm copies
    widest = 3 * hidden + (2 * heads + 2 * kv_heads) * head_dim + 3 * inter
    per_token = widest * element_bytes + 2 * hidden * 4
    if fp8:  # each linear's input quantised: an fp32 copy and the e4m3 values of its widest input
        per_token += max(hidden, inter) * 5
    if world > 1:  # ordered_all_reduce: send, receive, gathered buffers and the fp32 sum
        per_token += 3 * hidden * element_bytes + hidden // world * 4
    prefix_kv = layers * 2 * kv_heads * head_dim * element_bytes  # shared-prefix keys/values
    explicit_scores = getattr(config, "sliding_window", None) or getattr(config, "attn_logit_softcapping", None)
    fixed = 2 * heads * max_tokens * max_tokens * 4 if explicit_scores else 0
    return StepMemory(per_token=int((per_token + prefix_kv) * SLACK), fixed=int(fixed * SLACK), prefix_kv=int(prefix_kv * SLACK))


def module_bytes(*modules: nn.Module | torch.Tensor) -> int:
    total = 0
    for m in modules:
        tensors = [m] if isinstance(m, torch.Tensor) else [*m.parameters(), *m.buffers()]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def plan_step_tokens(
    memory: StepMemory,
    *,
    weights: int,
    budget: int | None,
    free: int | None,
    max_tokens: int,
    max_step_tokens: int | None,
    default: int,
    tile: int,
) -> int:
    """max_step_tokens for this budget: the one asked for if it fits, or as many whole tiles as fit
    (at most `default`) when it is None (auto). A step runs as whole tiles of `tile` rows (its last one
    filled up: torch_runtime), so it is planned at its tokens rounded up to the tile. ValueError naming
    the numbers when it does not fit, or when one `max_tokens` conversation does not."""
    if budget is not None:
        available, source = budget - weights, f"memory_budget {_gib(budget)} less the weights {_gib(weights)}"
    elif free is not None:
        available = int(free * (1 - RESERVE))
        source = f"{1 - RESERVE:.0%} of the {_gib(free)} free on the device after the weights ({_gib(weights)})"
    else:
        return max_step_tokens or default  # a CPU without a budget: nothing to plan against
    one = memory.bytes(whole_tiles(max_tokens, tile))
    if one > available:
        raise ValueError(
            f"memory: one {max_tokens}-token conversation needs {_gib(one)} of activations, but only {_gib(available)} "
            f"is left ({source}); lower max_tokens, use dtype fp8 or more tensor_parallel ranks, or raise memory_budget"
        )
    if max_step_tokens is not None:
        needed = memory.bytes(whole_tiles(max(max_step_tokens, max_tokens), tile))
        if needed > available:
            raise ValueError(
                f"memory: max_step_tokens {max_step_tokens} needs {_gib(needed)} of activations, but only {_gib(available)} "
                f"is left ({source}); lower max_step_tokens or set it to auto"
            )
        return max_step_tokens
    fits = (available - memory.fixed) // memory.per_token // tile * tile
    return max(min(fits, default), max_tokens)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
