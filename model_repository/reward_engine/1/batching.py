"""Token-budget batching: which sequences run together in one engine step."""

from __future__ import annotations

from collections.abc import Sequence


def plan_steps(lengths: Sequence[int], max_step_tokens: int) -> list[list[int]]:
    """Group sequence indices into steps of at most `max_step_tokens` tokens each.

    Sequences are taken longest first (first-fit decreasing), so that a step is filled with
    short sequences around the long ones instead of leaving the budget half used. A sequence
    longer than the budget runs alone in its own step. Every index appears exactly once.
    """
    if max_step_tokens < 1:
        raise ValueError(f"max_step_tokens must be positive, got {max_step_tokens}")
    steps: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        for step, free in enumerate(room):
            if length <= free:
                steps[step].append(index)
                room[step] -= length
                break
        else:
            steps.append([index])
            room.append(max(max_step_tokens - length, 0))
    return steps
