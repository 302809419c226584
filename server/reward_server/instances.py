"""Data parallelism: `engine_instances` copies of the whole model, each a Triton instance of reward_engine.

Triton's dynamic batcher hands each batch to whichever instance is free; each instance is its own
python-backend stub process (no GIL shared) driving its own devices: instance k, with tensor_parallel T,
runs on cuda:k*T .. cuda:k*T+T-1 (8 GPUs = 4 instances of TP 2). The count lives in Triton's config
(reward_engine's `instance_group`); `reward-server` writes it there from the setting (launcher/repository.py),
and each instance checks that the two agree, so that a count set in one place only fails the load
instead of silently running one copy. On a CPU the instances share the cores.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineInstance:
    """Which of its model's instances a Triton model instance is."""

    name: str  # Triton's: "<group>_<k>", the group being "<model>_<i>" ("reward_engine_0_1")
    index: int  # k, 0-based
    count: int  # instances Triton runs of the model


def engine_instance(args: Mapping[str, str]) -> EngineInstance:
    """This instance, from the args Triton hands a python model at initialize."""
    groups = json.loads(args["model_config"]).get("instance_group", [])
    count = sum(int(group.get("count", 1)) for group in groups) or 1
    if len(groups) > 1:
        raise ValueError(f"reward_engine: {len(groups)} instance groups; engine_instances needs one (kind KIND_CPU, count N)")
    if any(group.get("kind") == "KIND_GPU" for group in groups):  # its count is per GPU listed, or seen: not this count
        raise ValueError(
            "reward_engine: kind KIND_GPU runs `count` instances on every GPU the group lists (or, without `gpus`, sees), "
            "each on GPUs of its own choosing; the engine places itself on GPUs: use kind KIND_CPU, count N (engine_instances)"
        )
    name = args["model_instance_name"]
    suffix = name.rsplit("_", 1)[-1]
    return EngineInstance(name, int(suffix) if count > 1 and suffix.isdigit() else 0, count)


def check_count(setting: int, instance: EngineInstance) -> None:
    """ValueError unless Triton runs as many instances as `engine_instances` says."""
    if setting != instance.count:
        raise ValueError(
            f"engine_instances is {setting} but Triton runs {instance.count} reward_engine instance(s): reward-server sets "
            "Triton's count from the setting; with plain tritonserver set the same count in reward_engine's instance_group"
        )
