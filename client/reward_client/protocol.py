"""The wire contract: model and tensor names, and how model-config parameters are read.

Defined once here and used by the Triton models, the tests and the client. The names must
match the `config.pbtxt` files under model_repository/ (a test checks that they do).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ENSEMBLE_MODEL = "reward_model"
PREPROCESSING_MODEL = "preprocessing"
ENGINE_MODEL = "reward_engine"

CONVERSATION = "CONVERSATION"  # BYTES [1]: one JSON conversation
SCORE_TURNS = "SCORE_TURNS"  # BOOL [1], optional: also score every earlier assistant turn
INPUT_IDS = "INPUT_IDS"  # INT32 [-1]: the templated token ids
NUM_TOKENS = "NUM_TOKENS"  # INT32 [1]: how many tokens were scored
SCORE_AT = "SCORE_AT"  # INT32 [-1]: token positions where scores are read (assistant-turn ends), -1 padded
REWARD = "REWARD"  # FP32 [1]: the reward of the final assistant turn
ATTRIBUTES = "ATTRIBUTES"  # FP32 [-1]: all N outputs of the reward head for the final assistant turn
ATTRIBUTE_NAMES = "ATTRIBUTE_NAMES"  # BYTES [-1]: the N output names, in order
TURN_REWARDS = "TURN_REWARDS"  # FP32 [-1]: the reward at the end of each assistant turn, NaN padded
TURN_ATTRIBUTES = "TURN_ATTRIBUTES"  # FP32 [-1, -1]: the N outputs at the end of each assistant turn, NaN padded

MAX_BATCH_SIZE = 64  # rows one request may carry (max_batch_size of every model)

# The project's own Prometheus metrics on :8002, beside Triton's nv_* (docs/monitoring.md).
METRIC_REJECTED = "reward_requests_rejected_total"  # counter {model, reason}
METRIC_TOKENS = "reward_tokens_scored_total"  # counter {model}: tokens of every scored sequence
METRIC_PREFIX_REUSED = "reward_prefix_tokens_reused_total"  # counter {model}: tokens not recomputed (shared prefixes)
METRIC_TRUNCATED = "reward_truncated_rows_total"  # counter {model}: rows cut to max_tokens (NeMo-Aligner protocol)
METRIC_VALUE = "reward_value"  # histogram {model, attribute}: head outputs of the scored (final) turns
METRIC_STEP_TOKENS = "reward_engine_step_tokens"  # histogram {model}: tokens computed per packed engine step
METRIC_STEP_SECONDS = "reward_engine_step_duration_seconds"  # histogram {model}
REWARD_BUCKETS = [-32.0, -16.0, -8.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
STEP_TOKEN_BUCKETS = [float(2**k) for k in range(4, 16)]  # 16 .. 32,768
STEP_SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]

TRUE_STRINGS = {"1", "true", "yes", "on"}
FALSE_STRINGS = {"0", "false", "no", "off", ""}


def pad_rows(rows: Sequence[np.ndarray], fill: float) -> np.ndarray:
    """Rows of different lengths as one array [len(rows), longest, ...], right-padded with `fill`."""
    longest = max(len(row) for row in rows)
    first = np.asarray(rows[0])
    padded = np.full((len(rows), longest, *first.shape[1:]), fill, dtype=first.dtype)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    return padded


def read_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """`parameters` of a model config (as JSON: {key: {"string_value": v}}) as a plain dict."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


def parse_bool(value: str, name: str) -> bool:
    """The one meaning of a boolean parameter string."""
    lowered = value.strip().lower()
    if lowered in TRUE_STRINGS:
        return True
    if lowered in FALSE_STRINGS:
        return False
    raise ValueError(f"parameter {name}: {value!r} is not a boolean (use true or false)")


def parse_int(value: str, name: str, minimum: int = 1) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"parameter {name}: {value!r} is not an integer") from None
    if number < minimum:
        raise ValueError(f"parameter {name}: {number} is below the minimum {minimum}")
    return number


CHECKPOINT_ENV = "REWARD_CHECKPOINT"
RUNTIME_ENV = "REWARD_RUNTIME"
RUNTIMES = ("torch", "tensorrt_llm")


def resolve_runtime(parameter: str) -> str:
    """The engine runtime: $REWARD_RUNTIME if set, else the config parameter (default torch)."""
    runtime = os.environ.get(RUNTIME_ENV) or parameter or "torch"
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} (parameter runtime or ${RUNTIME_ENV}): expected one of {', '.join(RUNTIMES)}")
    return runtime


def resolve_checkpoint(parameter: str, model_dir: str) -> str:
    """The checkpoint to serve: $REWARD_CHECKPOINT if set, else the config parameter (relative to the model folder)."""
    chosen = os.environ.get(CHECKPOINT_ENV) or parameter
    if not chosen:
        raise ValueError(f"no checkpoint: set the 'checkpoint' parameter or ${CHECKPOINT_ENV}")
    path = Path(model_dir, chosen).resolve()
    if not path.is_dir():
        raise ValueError(f"checkpoint folder {path} does not exist (run `make setup`, or set ${CHECKPOINT_ENV})")
    return str(path)
