"""The engine's Prometheus metrics (python backend metrics API), created once per model instance."""

import numpy as np
import triton_python_backend_utils as pb_utils

from reward_client import protocol


class EngineMetrics:
    def __init__(self, model: str, attributes: list[str]) -> None:
        labels = {"model": model}
        counter, histogram = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.HISTOGRAM
        # The families must outlive their metrics: keep both.
        self.families = {
            "tokens": pb_utils.MetricFamily(protocol.METRIC_TOKENS, "Tokens of every scored sequence", counter),
            "reused": pb_utils.MetricFamily(protocol.METRIC_PREFIX_REUSED, "Prompt tokens not recomputed (shared prefixes)", counter),
            "values": pb_utils.MetricFamily(protocol.METRIC_VALUE, "Reward-head outputs of the scored turns", histogram),
            "step_tokens": pb_utils.MetricFamily(protocol.METRIC_STEP_TOKENS, "Tokens computed per packed engine step", histogram),
            "step_seconds": pb_utils.MetricFamily(protocol.METRIC_STEP_SECONDS, "Duration of a packed engine step", histogram),
        }
        self.tokens = self.families["tokens"].Metric(labels=labels)
        self.reused = self.families["reused"].Metric(labels=labels)
        self.values = [
            self.families["values"].Metric(labels={**labels, "attribute": name}, buckets=protocol.REWARD_BUCKETS) for name in attributes
        ]
        self.step_tokens = self.families["step_tokens"].Metric(labels=labels, buckets=protocol.STEP_TOKEN_BUCKETS)
        self.step_seconds = self.families["step_seconds"].Metric(labels=labels, buckets=protocol.STEP_SECONDS_BUCKETS)

    def step(self, scored: list[int], computed: list[int], prefixes: list[tuple[int, list[int]]], seconds: float) -> None:
        """One engine step: the lengths of every sequence it answered (`scored`, duplicates included)
        and of the distinct ones it ran (`computed`), of which groups shared a prefix."""
        reused = sum(length * (len(members) - 1) for length, members in prefixes)
        self.tokens.increment(sum(scored))
        self.reused.increment(reused)
        self.step_tokens.observe(sum(computed) - reused)
        self.step_seconds.observe(seconds)

    def scored(self, outputs: np.ndarray) -> None:
        """Final-turn head outputs [rows, N] of an answered request."""
        for metric, column in zip(self.values, np.asarray(outputs).T, strict=True):
            for value in column:
                metric.observe(float(value))
