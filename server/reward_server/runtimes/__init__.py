"""Engine runtimes behind one typed contract, and the choice between them.

`torch` (runtimes/torch_runtime.py): a transformers trunk + reward head, CPU or GPU; the reference
every other runtime is checked against. `tensorrt_llm` (runtimes/trtllm_runtime.py): an engine built
by `make engine`, head folded into lm_head; needs tensorrt_llm and a GPU (unverified here).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from reward_server.batching import Step
from reward_server.head_spec import HeadSpec
from reward_server.prefix_cache import CacheCounters
from reward_server.settings import Settings


class RewardEngine(Protocol):
    """What the Triton models and `batching` need of a runtime."""

    spec: HeadSpec  # output names, the reward rule
    vocab_size: int  # token ids must lie below this
    supports_turns: bool  # can read scores at any position, not only at the last token
    cache_counters: CacheCounters | None  # the prefix cache's cumulative counters; None without a cache
    # Of the last score_step: seconds its host thread waited for the device's results after launching its
    # work (≈ 0 on a CPU, where the work runs as it is launched); None where not measured.
    device_wait: float | None

    def read_positions(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        """Where each sequence's outputs are read: `positions` (default: its last token), adjusted as the
        checkpoint reads them (a classifier skips trailing pad tokens)."""
        ...

    def plan(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray]) -> list[Step]:
        """The steps that score these sequences (batching.Step: which run together, which share a prefix)."""
        ...

    def score_step(
        self, sequences: list[np.ndarray], prefixes: Sequence[tuple[int, list[int]]], positions: Sequence[np.ndarray]
    ) -> np.ndarray:
        """Head outputs [sum of len(positions[i]), N] of one step, sequence after sequence."""
        ...


def load_engine(settings: Settings, instance: int = 0) -> RewardEngine:
    """The runtime that `settings.runtime` names, on `settings.checkpoint`; `instance`: which of the
    `engine_instances` this is (instances.py), which picks its GPUs."""
    checkpoint = str(settings.require_checkpoint())
    if settings.runtime == "tensorrt_llm":
        if settings.engine_instances > 1:
            raise ValueError("engine_instances > 1 needs runtime torch (a TensorRT-LLM engine sets its own GPUs)")
        from reward_server.runtimes.trtllm_runtime import TrtllmRewardEngine  # needs tensorrt_llm and a GPU

        return TrtllmRewardEngine(checkpoint, settings.max_tokens)
    from reward_server.runtimes.torch_runtime import TorchRewardEngine

    share = settings.engine_instances * settings.tensor_parallel
    gpus = torch.cuda.device_count() if settings.device in ("auto", "cuda") else 0
    if share > gpus > 0 and settings.memory_budget is None:
        # Each instance would plan its steps on the memory free when it loaded, counting on memory another takes.
        raise ValueError(
            f"engine_instances {settings.engine_instances} x tensor_parallel {settings.tensor_parallel} ranks share {gpus} GPU(s): "
            "set memory_budget (bytes per rank: its weights and steps) so that the instances on one GPU fit it together"
        )
    return TorchRewardEngine(
        checkpoint,
        device=settings.device,
        dtype=settings.dtype,
        max_step_tokens=settings.max_step_tokens,
        min_shared_prefix=settings.min_shared_prefix,
        prefix_cache_tokens=settings.prefix_cache_tokens,
        tile_rows=settings.tile_rows,
        attention=settings.attention,
        cuda_graphs=settings.cuda_graphs,
        tensor_parallel=settings.tensor_parallel,
        memory_budget=settings.memory_budget,
        max_tokens=settings.max_tokens,
        exit_on_rank_failure=True,  # a server's engine stub exits; the supervisor restarts the server
        fp8_bf16_layers=settings.fp8_bf16_layers,
        first_device=instance * settings.tensor_parallel,
        threads=max(1, (os.cpu_count() or 1) // share) if settings.engine_instances > 1 else None,  # on a CPU: shared
    )
