"""Token-budget batching: which sequences run together in one engine step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Step:
    """Sequences scored in one engine step, and the groups among them that share a prefix."""

    indices: list[int]  # into the sequences given to the engine's `plan`
    prefixes: list[tuple[int, list[int]]]  # (prefix length, positions within `indices`) per group


def plan_steps(lengths: Sequence[int], max_step_tokens: int) -> list[list[int]]:
    """Group sequence indices into steps of at most `max_step_tokens` tokens each, shortest first.

    Sequences are taken in increasing length and each step is filled before the next one opens,
    so short requests finish in the first steps instead of waiting behind long ones. A sequence
    longer than the budget runs alone in its own step. Every index appears exactly once.
    """
    if max_step_tokens < 1:
        raise ValueError(f"max_step_tokens must be positive, got {max_step_tokens}")
    steps: list[list[int]] = []
    used = max_step_tokens
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if used + lengths[index] > max_step_tokens:
            steps.append([])
            used = 0
        steps[-1].append(index)
        used += lengths[index]
    return steps


def shared_prefixes(sequences: Sequence[Sequence[int]], min_prefix: int) -> list[tuple[int, list[int]]]:
    """Groups of at least two sequences that share a token prefix of at least `min_prefix` tokens.

    Returns (prefix_length, member indices) per group (best-of-n: one prompt, n responses).
    Sequences are sorted, and each run of neighbours whose common prefix stays at least
    `min_prefix` long becomes a group sharing the run's shortest common prefix. The prefix
    always leaves each member at least one token of its own, so that every member's last token
    is computed in its own suffix. Sequences in no group are left out.
    """
    arrays = [np.asarray(s) for s in sequences]
    order = sorted(range(len(arrays)), key=lambda i: tuple(arrays[i].tolist()))
    groups: list[tuple[int, list[int]]] = []
    members: list[int] = order[:1]
    prefix = 0
    for current in order[1:]:
        previous = members[-1]
        common = min(_common_prefix(arrays[previous], arrays[current]), len(arrays[previous]) - 1, len(arrays[current]) - 1)
        if common >= min_prefix:
            prefix = common if len(members) == 1 else min(prefix, common)
            members.append(current)
            continue
        if len(members) > 1:
            groups.append((prefix, members))
        members, prefix = [current], 0
    if len(members) > 1:
        groups.append((prefix, members))
    return groups


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
