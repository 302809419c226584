"""What scoring returns: the reward as a float, with every output of the reward head by name."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


class Score(float):
    """The reward of one assistant turn. It *is* that float (`float(score)`, comparisons, sums);
    `attributes` holds all of the reward head's outputs by name (one, "reward", for -HF checkpoints;
    e.g. nine SteerLM attributes for a NeMo-Aligner head)."""

    attributes: Mapping[str, float]

    def __new__(cls, reward: float, attributes: Mapping[str, float]) -> Score:
        score = super().__new__(cls, reward)
        score.attributes = dict(attributes)
        return score

    @property
    def reward(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"Score({float(self)!r}, attributes={dict(self.attributes)!r})"

    def __reduce__(self):  # float's own pickling would drop the attributes
        return (Score, (float(self), dict(self.attributes)))


@dataclass(frozen=True)
class Ranked:
    """One response of a ranking: where it was in the input, its text and its Score."""

    index: int
    response: str
    score: Score


def preference(reward_a: float, reward_b: float) -> float:
    """P(a ≻ b) under the Bradley–Terry model reward models are trained with: σ(r_a − r_b)."""
    margin = float(reward_a) - float(reward_b)
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    return math.exp(margin) / (1.0 + math.exp(margin))  # the same, without overflow for large margins
