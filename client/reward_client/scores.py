"""What scoring returns: the reward as a float, with every output of the reward head by name."""

from __future__ import annotations

from collections.abc import Mapping


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
