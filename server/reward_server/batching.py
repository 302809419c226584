"""Token-budget batching: which sequences run together in one engine step."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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


def unique(sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray]) -> tuple[list[int], list[list[int]]]:
    """Representatives of the distinct (tokens, read positions) pairs, and the indices each stands for."""
    first: dict[tuple[bytes, bytes], int] = {}
    members: list[list[int]] = []
    for i, (sequence, read) in enumerate(zip(sequences, positions, strict=True)):
        key = (np.asarray(sequence, dtype=np.int64).tobytes(), np.asarray(read, dtype=np.int64).tobytes())
        if key not in first:
            first[key] = len(members)
            members.append([])
        members[first[key]].append(i)
    return [group[0] for group in members], members


@dataclass
class StepResult:
    """What one engine step finished: the sequences (indices into the caller's list) and their
    outputs ([reads, N] each), or the error that failed them all."""

    indices: list[int]
    outputs: list[np.ndarray] | None
    error: Exception | None
    computed: list[int]  # lengths of the distinct sequences the step ran
    prefixes: list[tuple[int, list[int]]]
    seconds: float
    cache: Any = None  # prefix_cache.CacheCounters of this step (bytes_held: after it), None when no cache
    device_wait: float | None = None  # of `seconds`, the wait for the device's results (RewardEngine.device_wait)
    last: bool = True  # the last step of its run_steps: nothing is scored after it

    @property
    def reused(self) -> int:
        """Tokens of the distinct sequences not computed: shared prompts after the first member, cached blocks."""
        cached = self.cache.hits * self.cache.block_tokens if self.cache is not None else 0
        return sum(length * (len(members) - 1) for length, members in self.prefixes) + cached


def run_steps(engine: Any, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray]) -> Iterator[StepResult]:
    """Score `sequences` with an engine (`plan`, `score_step`), step by step; identical sequences run once.
    A failing step is reported in its StepResult and the later steps still run."""
    representatives, members = unique(sequences, positions)
    steps = engine.plan([sequences[r] for r in representatives], [positions[r] for r in representatives])
    for number, step in enumerate(steps, 1):
        last = number == len(steps)
        chosen = [representatives[u] for u in step.indices]
        indices = [i for u in step.indices for i in members[u]]
        computed = [len(sequences[i]) for i in chosen]
        started = time.perf_counter()
        counted = engine.cache_counters
        try:
            scored = engine.score_step([sequences[i] for i in chosen], step.prefixes, [positions[i] for i in chosen])
        except Exception as exc:  # reported; the caller fails only this step's requests
            seconds = time.perf_counter() - started
            yield StepResult(indices, None, exc, computed, step.prefixes, seconds, _since(engine, counted), last=last)
            continue
        bounds = np.cumsum([0, *(len(positions[i]) for i in chosen)])
        outputs = [scored[bounds[k] : bounds[k + 1]] for k, u in enumerate(step.indices) for _ in members[u]]
        seconds = time.perf_counter() - started
        yield StepResult(indices, outputs, None, computed, step.prefixes, seconds, _since(engine, counted), engine.device_wait, last)


def _since(engine: Any, counted: Any) -> Any:
    return None if counted is None else engine.cache_counters.since(counted)


def score_all(engine: Any, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Head outputs [P, N] at `positions` (per sequence, ascending; default: its last token),
    sequence after sequence: [len(sequences), N] by default. Raises the first failing step's error."""
    positions = engine.read_positions(sequences, positions)
    outputs: list[np.ndarray] = [np.empty(0)] * len(sequences)
    for result in run_steps(engine, sequences, positions):
        if result.error is not None:
            raise result.error
        for i, output in zip(result.indices, result.outputs, strict=True):
            outputs[i] = output
    return np.concatenate(outputs) if outputs else np.zeros((0, len(engine.spec.names)), np.float32)
