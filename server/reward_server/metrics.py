"""The project's own Prometheus metrics on :8002, beside Triton's nv_* (docs/monitoring.md): names,
label values and buckets, defined once for the Triton models, the tests and the dashboards."""

from __future__ import annotations

from reward_server.errors import REJECTION_REASONS

REJECTED = "reward_requests_rejected_total"  # counter {model, reason}: answered INVALID_ARG, counted by the model that answered
# counter {model}: answered with an error that is not a rejection of the request as sent (INTERNAL). Triton 2.51
# counts a python model's error answers as successes (and an ensemble's failures twice): these two tell them.
FAILED = "reward_requests_failed_total"
TOKENS = "reward_tokens_scored_total"  # counter {model}: tokens of every scored sequence
PREFIX_REUSED = "reward_prefix_tokens_reused_total"  # counter {model}: tokens not recomputed (shared prefixes, prefix cache)
CACHE_HITS = "reward_prefix_cache_hit_blocks_total"  # counter {model}: 64-token blocks found in the prefix cache
CACHE_MISSES = "reward_prefix_cache_miss_blocks_total"  # counter {model}: blocks looked up there and not found
CACHE_EVICTIONS = "reward_prefix_cache_evicted_blocks_total"  # counter {model}
CACHE_BYTES = "reward_prefix_cache_bytes"  # gauge {model}: keys/values held by the prefix cache
TRUNCATED = "reward_truncated_rows_total"  # counter {model}: rows cut to max_tokens (NeMo-Aligner protocol)
VALUE = "reward_value"  # histogram {model, attribute}: head outputs of the scored (final) turns
STEP_TOKENS = "reward_engine_step_tokens"  # histogram {model}: tokens computed per packed engine step
STEP_SECONDS = "reward_engine_step_duration_seconds"  # histogram {model}
# histogram {model}: of a step's duration, the time spent waiting for the device's results after its last launch
STEP_DEVICE_WAIT = "reward_engine_step_device_wait_seconds"

# Powers of two both ways, and half steps over 0-4: the HelpSteer attributes' scale (NeMo-Aligner and Nemotron-4-340B heads)
REWARD_BUCKETS = [-32.0, -16.0, -8.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 8.0, 16.0, 32.0]
STEP_TOKEN_BUCKETS = [float(2**k) for k in range(4, 18)]  # 16 .. 131,072 (a best-of-n group may exceed max_step_tokens)
STEP_SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
DEVICE_WAIT_BUCKETS = [0.0001, 0.0005, 0.001, 0.0025, *STEP_SECONDS_BUCKETS]  # 0.1 ms .. 30 s: near 0 when launching is the bottleneck


class RequestOutcomes:
    """What every model that answers requests counts of its error answers: rejections by reason and failures.
    `metric_family` is the python backend's pb_utils.MetricFamily (this package does not import Triton)."""

    def __init__(self, metric_family, labels: dict[str, str]) -> None:
        # The families must outlive their metrics: keep both.
        self.families = (
            metric_family(REJECTED, "Requests answered INVALID_ARG, by reason", metric_family.COUNTER),
            metric_family(FAILED, "Requests answered with an internal error", metric_family.COUNTER),
        )
        self.rejections = {reason: self.families[0].Metric(labels={**labels, "reason": reason}) for reason in REJECTION_REASONS}
        self.failures = self.families[1].Metric(labels=labels)

    def rejected(self, reason: str) -> None:
        self.rejections[reason].increment(1)

    def failed(self) -> None:
        self.failures.increment(1)
