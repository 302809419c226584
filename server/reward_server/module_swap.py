"""One walk that swaps a model's submodules for others: the engine's tiled products (invariance.py), FP8
layers (fp8.py) and fused norms (norms.py) are each made this way."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace_modules(root: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Every submodule of `root` (as found before any swap) for which `replace` returns a module is swapped
    for it in its parent; `replace` returns None to keep one."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            swapped = replace(child)
            if swapped is not None:
                setattr(parent, name, swapped)
    return root
