"""Sibling projections of one input as one product: attention's q/k/v, a gated MLP's gate/up.

transformers' decoder layers call q_proj, k_proj and v_proj (gate_proj and up_proj) one after another on
the same tensor. Here their weights are stacked into one matrix: the input is read once, the product is one
call (or one set of tiles, invariance.py) instead of three, a GPU gets one large product where the k/v ones
were narrow, fewer kernels are launched per layer (what bounds a small step's time on a GPU: README,
Benchmark), and under FP8 the input is quantised once instead of once per projection. Each former
projection becomes a `Columns` module that returns its columns of the shared product: the first of them
called with an input computes the product, the others take their columns of it.

The arithmetic of a column does not change (the same dot product over the same input row), but the
product's kernel is chosen for the stacked shape, so scores may differ from the unstacked layers in their
last bits: within the parity tolerances, and batch invariant as every tiled product (the stacked shapes are
probed at load like any other). Under tensor parallelism the stacking comes after the split: each rank
stacks its own heads' rows.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn

# (the layer's child, the stacked product's name, the projections taking one input): Llama, Mistral, Qwen2,
# Gemma 2, Nemotron (its MLP has no gate: nothing to stack there)
SIBLINGS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


class SharedProduct(nn.Module):
    """One nn.Linear over the stacked weights of sibling projections, and the last input's product."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        super().__init__()
        weight = torch.cat([linear.weight.detach() for linear in linears])
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.linear.weight = nn.Parameter(weight, requires_grad=False)
        if any(linear.bias is not None for linear in linears):
            bias = [weight.new_zeros(linear.out_features) if linear.bias is None else linear.bias.detach() for linear in linears]
            self.linear.bias = nn.Parameter(torch.cat(bias), requires_grad=False)
        self.bounds = list(accumulate((linear.out_features for linear in linears), initial=0))
        self.made = _Made()

    def columns(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Projection `index`'s output for `x`: its columns of the product, computed if `x` is not the
        input the product was last made for (or this projection already took its columns of it)."""
        made = self.made
        if x is not made.input or index not in made.pending:
            made.input, made.output, made.pending = x, self.linear(x), set(range(len(self.bounds) - 1))
        made.pending.discard(index)
        out = made.output[..., self.bounds[index] : self.bounds[index + 1]]
        if not made.pending:  # every sibling has its columns: hold nothing between steps
            made.input = made.output = None
        return out


class _Made:
    """The last product of a SharedProduct: a plain object, so that setting it costs what a Python attribute
    costs (an nn.Module's __setattr__ checks parameters, buffers and submodules: 12 % of a small step's host
    time with 5 sets per product, on this CPU)."""

    __slots__ = ("input", "output", "pending")

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.pending: set[int] = set()


class Columns(nn.Module):
    """What a stacked projection's callers call: its columns of the shared product."""

    def __init__(self, shared: SharedProduct, index: int) -> None:
        super().__init__()
        self._shared = [shared]  # in a list: not a submodule (the layer holds it once, and `.to` moves it once)
        self.index = index
        self.out_features = shared.bounds[index + 1] - shared.bounds[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared[0].columns(self.index, x)


def stack_siblings(trunk: nn.Module) -> nn.Module:
    """In every decoder layer of `trunk`, each group of `SIBLINGS` that are all nn.Linear of one input size
    becomes one SharedProduct (`self_attn.qkv_proj`, `mlp.gate_up_proj`) and their Columns."""
    for layer in trunk.layers:
        for child, stacked, names in SIBLINGS:
            parent = getattr(layer, child, None)
            linears = [getattr(parent, name, None) for name in names]
            if not all(type(linear) is nn.Linear for linear in linears) or len({lin.in_features for lin in linears}) != 1:
                continue
            shared = SharedProduct(linears)
            parent.add_module(stacked, shared)
            for index, name in enumerate(names):
                setattr(parent, name, Columns(shared, index))
    return trunk
