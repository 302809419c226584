"""The engine model's request logic, free of Triton: check each request's tensors, score the rows of
all requests of a batch together (batching.run_steps), and answer each request as soon as its
last row is scored. `model_repository/reward_engine/1/model.py` adapts it to pb_utils."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from reward_client import protocol
from reward_server.batching import StepResult, run_steps
from reward_server.errors import EngineError, RequestError
from reward_server.runtimes import RewardEngine
from reward_server.tensors import pad_rows


@dataclass
class Rows:
    """One request's token-id rows and the positions where each row's scores are read."""

    ids: list[np.ndarray]
    reads: list[np.ndarray]


def request_rows(engine: RewardEngine, max_tokens: int, ids: np.ndarray, lengths: np.ndarray, score_at: np.ndarray | None) -> Rows:
    """The rows of one request's INPUT_IDS [B, L], NUM_TOKENS [B, 1] and optional SCORE_AT [B, T];
    RequestError names what is wrong (the engine is callable directly, not only behind preprocessing)."""
    rows = []
    longest = min(ids.shape[1], max_tokens) if ids.ndim == 2 else 0
    lengths = lengths.reshape(-1)
    if ids.ndim != 2 or len(lengths) != ids.shape[0] or not len(lengths):
        raise RequestError(f"{protocol.INPUT_IDS} must be [rows, tokens] with one {protocol.NUM_TOKENS} per row, rows >= 1", "tensors")
    for b, length in enumerate(lengths):
        if not 1 <= length <= longest:
            raise RequestError(f"row {b}: {protocol.NUM_TOKENS} {length} is not between 1 and {longest}", "tensors")
        row = ids[b, :length]
        if row.min() < 0 or row.max() >= engine.vocab_size:
            raise RequestError(f"row {b}: token ids must lie in [0, {engine.vocab_size})", "tensors")
        rows.append(row)
    if score_at is None:
        return Rows(rows, [np.array([len(row) - 1]) for row in rows])
    if score_at.ndim != 2 or score_at.shape[0] != len(rows):
        raise RequestError(f"{protocol.SCORE_AT} must be [rows, positions]", "tensors")
    reads = [positions[positions >= 0] for positions in score_at]
    for b, (row, positions) in enumerate(zip(rows, reads, strict=True)):
        padded = np.any(score_at[b, len(positions) :] != -1)  # anything but trailing -1 among the negatives
        if padded or not len(positions) or positions[-1] >= len(row) or np.any(np.diff(positions) <= 0):
            raise RequestError(
                f"row {b}: {protocol.SCORE_AT} must list ascending positions below its {len(row)} tokens, then -1 padding", "tensors"
            )
        if (len(positions) > 1 or positions[-1] != len(row) - 1) and not engine.supports_turns:
            raise RequestError("per-turn scores need the torch runtime (this engine reads only the last token)", "per_turn")
    return Rows(rows, reads)


@dataclass
class Answer:
    """What one request gets: its output tensors by name, or the error that failed it."""

    request: int  # index into the batch's requests
    outputs: dict[str, np.ndarray] | None
    error: EngineError | None
    last_step: bool = True  # from the batch's last step: no answer comes after it


def answers(
    engine: RewardEngine, requests: Sequence[Rows | None], on_step: Callable[[StepResult, list[int]], None] = lambda result, lengths: None
) -> Iterator[Answer]:
    """Score every row of every request (None: a request already refused) in the engine's steps and
    yield each request's Answer as soon as its last row is scored: short requests do not wait for long
    ones. A failing step fails only the requests with rows in it; should anything outside the steps fail
    (planning, say), every request not answered yet gets an EngineError: each request gets exactly one
    answer, whatever fails. `on_step(result, lengths)` sees each step and the lengths of the rows it answered
    (none for a failed step: its cache lookups and evictions still happened)."""
    answered: set[int] = set()
    try:
        sequences, reads, owner = [], [], []
        for r, rows in enumerate(requests):
            if rows is not None:
                sequences += rows.ids
                reads += rows.reads
                owner += [r] * len(rows.ids)
        reads = engine.read_positions(sequences, reads)
        outputs: list[np.ndarray | None] = [None] * len(sequences)  # row i's head outputs [reads, N]
        rows_left = np.bincount(owner, minlength=len(requests))
        for result in run_steps(engine, sequences, reads):
            on_step(result, [] if result.error is not None else [len(sequences[i]) for i in result.indices])
            if result.error is None:
                for i, output in zip(result.indices, result.outputs, strict=True):
                    outputs[i] = output
            for i in result.indices:
                rows_left[owner[i]] -= 1
            for r in sorted({owner[i] for i in result.indices} - answered):
                if result.error is not None:
                    yield Answer(r, None, EngineError.caused_by(result.error), result.last)
                elif rows_left[r] == 0:
                    yield Answer(r, response_tensors(engine, [outputs[i] for i, o in enumerate(owner) if o == r]), None, result.last)
                else:
                    continue  # rows of this request still wait in later steps
                answered.add(r)
    except Exception as exc:
        error = EngineError.caused_by(exc)
        for r, rows in enumerate(requests):
            if rows is not None and r not in answered:
                yield Answer(r, None, error)


def response_tensors(engine: RewardEngine, outputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """One request's output tensors from each row's head outputs [T_row, N]."""
    turns = pad_rows(outputs, np.nan)  # [B, T, N]
    names = np.array([name.encode() for name in engine.spec.names], dtype=np.object_)
    return {
        protocol.REWARD: np.array([[engine.spec.reward(o[-1])] for o in outputs], dtype=np.float32),
        protocol.ATTRIBUTES: np.stack([o[-1] for o in outputs]),
        protocol.ATTRIBUTE_NAMES: np.tile(names, (len(outputs), 1)),
        protocol.TURN_REWARDS: engine.spec.reward(turns).astype(np.float32),
        protocol.TURN_ATTRIBUTES: turns,
    }
