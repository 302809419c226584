"""The project's own Prometheus metrics on :8002, beside Triton's nv_* (docs/monitoring.md): names,
label values and buckets, defined once for the Triton models, the tests and the dashboards."""

from __future__ import annotations

REJECTED = "reward_requests_rejected_total"  # counter {model, reason}
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

REWARD_BUCKETS = [-32.0, -16.0, -8.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
STEP_TOKEN_BUCKETS = [float(2**k) for k in range(4, 16)]  # 16 .. 32,768
STEP_SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
DEVICE_WAIT_BUCKETS = [0.0001, 0.0005, 0.001, 0.0025, *STEP_SECONDS_BUCKETS]  # 0.1 ms .. 30 s: near 0 when launching is the bottleneck
