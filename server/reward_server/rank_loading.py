"""One tensor-parallel rank's share of a checkpoint, read from its safetensors files slice by slice.

Loading the whole checkpoint in every rank and cutting it there (`from_pretrained`, then
`shard_trunk`) holds the whole model in each rank's private memory whenever the load changes its dtype
(a bf16 checkpoint served in fp32: measured, tests/test_rank_loading.py); loaded in its own dtype,
transformers 5.24 keeps views of the mapped file, shared page cache, but that is its behaviour, not a
promise. Here the model is built with its parameters on the meta device (no memory; buffers such as the
rotary frequencies are computed for real, as accelerate's `init_empty_weights(include_buffers=False)`
does), `shard_trunk` reads each decoder layer's part with safetensors' `get_slice` (only the part is
copied), and every other parameter (embeddings, norms, the head's source) is read whole, in the
model's dtype.

Checkpoint keys are the model's own parameter names, as `save_pretrained` writes them. A checkpoint that
does not name every parameter so (`.bin` files, keys from another layout that `from_pretrained` would
rename) is loaded whole instead, with a warning saying why: correct, without the memory saving.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from reward_server.parallel import shard_trunk

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; their buffers stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


class Checkpoint:
    """The tensors of a folder's safetensors files (one file, or shards named by the index), by key."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._open = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}

    @classmethod
    def find(cls, folder: Path) -> Checkpoint | None:
        if (folder / INDEX).exists():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            return cls({key: folder / file for key, file in weight_map.items()})
        if (folder / SINGLE).exists():
            with safe_open(folder / SINGLE, framework="pt") as handle:
                return cls(dict.fromkeys(handle.keys(), folder / SINGLE))
        return None

    def read(self, key: str, dtype: torch.dtype, dim: int = 0, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Tensor `key`, or `count` of its entries along `dim` from `start`, in `dtype`."""
        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = self._open.enter_context(safe_open(path, framework="pt"))
        part = self._handles[path].get_slice(key)
        if count is not None:
            part = part[start : start + count] if dim == 0 else part[:, start : start + count]
        else:
            part = part[:]
        return part.to(dtype, copy=True)  # own storage: safetensors' slice is a view of the whole tensor

    def close(self) -> None:
        self._open.close()


def load_rank_model(auto, folder: Path, config, dtype: torch.dtype, attn_implementation: str, rank: int, world: int) -> nn.Module | None:
    """The `auto` model of `folder` holding rank `rank` of `world`'s share of its decoder layers (and
    everything else whole), each rank reading only its part; None (after a warning) when the checkpoint
    cannot be read so (the caller loads it whole)."""
    checkpoint = Checkpoint.find(folder)
    if checkpoint is None:
        return _whole(folder, f"no {SINGLE} or {INDEX}")
    with parameters_on_meta():
        model = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # from_pretrained ties after loading; here the tied names must share one tensor first
    persistent = set(model.state_dict())
    names: dict[int, list[str]] = {}  # a parameter's names (a tied head has the embedding's too)
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    source = {key: next((n for n in group if n in checkpoint.files), None) for key, group in names.items()}
    missing = sorted(names[key][0] for key, name in source.items() if name is None)
    if missing:
        return _whole(folder, f"the checkpoint names {len(missing)} parameter(s) otherwise, e.g. {missing[0]}")
    trunk = model.base_model
    prefix = next(name for name, module in model.named_modules() if module is trunk)
    try:
        shard_trunk(trunk, rank, world, read=lambda name, dim, start, count: checkpoint.read(f"{prefix}.{name}", dtype, dim, start, count))
        loaded: dict[int, nn.Parameter] = {}
        for name, param in list(model.named_parameters(remove_duplicate=False)):  # what the split left: whole
            if param.is_meta:
                if id(param) not in loaded:  # tied names share one tensor, read once
                    loaded[id(param)] = nn.Parameter(checkpoint.read(source[id(param)], param.dtype), requires_grad=False)
                owner, _, field = name.rpartition(".")
                setattr(model.get_submodule(owner), field, loaded[id(param)])
        for name, buffer in model.named_buffers():
            if name in persistent and name in checkpoint.files:
                buffer.copy_(checkpoint.read(name, buffer.dtype))
    finally:
        checkpoint.close()
    return model.eval()


def _whole(folder: Path, why: str) -> None:
    print(f"reward engine: {folder}: {why}; every tensor-parallel rank loads the whole checkpoint", file=sys.stderr, flush=True)
    return None
