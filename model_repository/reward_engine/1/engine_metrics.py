"""The engine's Prometheus metrics (python backend metrics API), created once per model instance."""

import numpy as np
import triton_python_backend_utils as pb_utils

from reward_server import metrics


class EngineMetrics:
    def __init__(self, model: str, instance: str, attributes: list[str]) -> None:
        # One series per instance (engine_instances > 1). Not "instance": Prometheus sets that one to the scrape
        # target's address, and would rename this to exported_instance.
        labels = {"model": model, "engine_instance": instance}
        self.outcomes = metrics.RequestOutcomes(pb_utils.MetricFamily, labels)
        counter, histogram, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.HISTOGRAM, pb_utils.MetricFamily.GAUGE
        # The families must outlive their metrics: keep both.
        self.families = {
            "tokens": pb_utils.MetricFamily(metrics.TOKENS, "Tokens of every scored sequence", counter),
            "reused": pb_utils.MetricFamily(metrics.PREFIX_REUSED, "Prompt tokens not recomputed (shared prefixes, prefix cache)", counter),
            "hits": pb_utils.MetricFamily(metrics.CACHE_HITS, "Blocks of 64 tokens found in the prefix cache", counter),
            "misses": pb_utils.MetricFamily(metrics.CACHE_MISSES, "Blocks looked up in the prefix cache and not found", counter),
            "evictions": pb_utils.MetricFamily(metrics.CACHE_EVICTIONS, "Blocks evicted from the prefix cache", counter),
            "cache_bytes": pb_utils.MetricFamily(metrics.CACHE_BYTES, "Bytes of keys/values the prefix cache holds", gauge),
            "values": pb_utils.MetricFamily(metrics.VALUE, "Reward-head outputs of the scored turns", histogram),
            "step_tokens": pb_utils.MetricFamily(metrics.STEP_TOKENS, "Tokens computed per packed engine step", histogram),
            "step_seconds": pb_utils.MetricFamily(metrics.STEP_SECONDS, "Duration of a packed engine step", histogram),
            "device_wait": pb_utils.MetricFamily(
                metrics.STEP_DEVICE_WAIT, "Of a packed engine step, the wait for the device's results after the last launch", histogram
            ),
        }
        self.tokens = self.families["tokens"].Metric(labels=labels)
        self.reused = self.families["reused"].Metric(labels=labels)
        self.cache = {name: self.families[name].Metric(labels=labels) for name in ("hits", "misses", "evictions", "cache_bytes")}
        self.values = [
            self.families["values"].Metric(labels={**labels, "attribute": name}, buckets=metrics.REWARD_BUCKETS) for name in attributes
        ]
        self.step_tokens = self.families["step_tokens"].Metric(labels=labels, buckets=metrics.STEP_TOKEN_BUCKETS)
        self.step_seconds = self.families["step_seconds"].Metric(labels=labels, buckets=metrics.STEP_SECONDS_BUCKETS)
        self.device_wait = self.families["device_wait"].Metric(labels=labels, buckets=metrics.DEVICE_WAIT_BUCKETS)

    def step(self, result, scored: list[int]) -> None:
        """One engine step (batching.StepResult): the lengths of every sequence it answered (`scored`,
        duplicates included) and of the distinct ones it ran, of which groups shared a prefix. Each update is a
        round trip to Triton while the device idles between steps: counters that did not move are left alone.
        A failed step scored nothing; its prefix cache lookups and evictions happened, and are counted."""
        if result.cache is not None:
            for name, count in (("hits", result.cache.hits), ("misses", result.cache.misses), ("evictions", result.cache.evictions)):
                if count:
                    self.cache[name].increment(count)
            self.cache["cache_bytes"].set(result.cache.bytes_held)
        if result.error is not None:
            return
        self.tokens.increment(sum(scored))
        if result.reused:
            self.reused.increment(result.reused)
        self.step_tokens.observe(sum(result.computed) - result.reused)
        self.step_seconds.observe(result.seconds)
        if result.device_wait is not None:
            self.device_wait.observe(result.device_wait)

    def scored(self, outputs: np.ndarray) -> None:
        """Final-turn head outputs [rows, N] of an answered request."""
        for metric, column in zip(self.values, np.asarray(outputs).T, strict=True):
            for value in column:
                metric.observe(float(value))
