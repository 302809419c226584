"""The `tensorrt_llm` runtime: a TensorRT-LLM engine built by `make engine`, head folded into lm_head.

TensorRT-LLM returns no hidden states (NVIDIA/TensorRT-LLM#4414), so build/trtllm_checkpoint.py puts
the reward head in rows 0..N-1 of a full-vocabulary lm_head; one generated step's logits (engine
built with --gather_generation_logits, --logits_dtype float32) are the logits at the last prompt
token, and their first N entries, plus reward_head.json's bias, are the head's outputs. Context
logits are never gathered (~2 GB per 4,096-token request at a 128k vocabulary).

Tensor parallelism (tensorrt_llm/runtime/model_runner_cpp.py, TensorRT-LLM 1.0): one process per MPI
rank (one tritonserver each, docs/tensorrt-llm.md). `from_dir` builds `WorldConfig.mpi()` and asserts
`rank == world_config.rank`, so each rank passes its own MPI rank (`tensorrt_llm.mpi_rank()`, as
examples/run.py does). The executor runs in LEADER mode: only MPI rank 0 takes requests (its executor
`can_enqueue_requests()`; `ModelRunnerCpp` keeps it as `session`, a private name, so the rank decides
here), and `generate` returns `[]` on the others, which run their share of every step inside the
executor. Those ranks load the engine and never score.

The engine's `max_input_len` is fixed when it is built: a server whose `max_tokens` is larger would
pass longer requests to `generate`, which refuses the whole call (every request of the batch), so the
engine is refused at load instead (`check_input_limit`).

Precision: `lm_head` has the checkpoint's dtype (TensorRT-LLM's Llama builds it as
`ColumnLinear(..., dtype=config.dtype)`; `--logits_dtype float32` only casts its bf16 output), so a bf16
engine's reward carries 8 significant bits: steps of 0.0625 for |r| in [8, 16). docs/tensorrt-llm.md,
"Precision of the reward".

Written against TensorRT-LLM 1.0's `ModelRunnerCpp`; it only runs where `tensorrt_llm` and a GPU
exist, which none of this project's test machines have: UNVERIFIED.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from reward_server.batching import Step, score_all
from reward_server.errors import EngineError
from reward_server.head_spec import read_head_spec


class TrtllmRewardEngine:
    """A `RewardEngine` (runtimes/__init__.py) on a TensorRT-LLM engine folder."""

    supports_turns = False  # generation logits exist only at the last prompt token
    cache_counters = None  # no prefix cache
    device_wait = None  # not measured: the executor runs and waits in its own threads

    def __init__(self, engine_dir: str, max_tokens: int) -> None:
        config = json.loads((Path(engine_dir) / "config.json").read_text())
        check_input_limit(config, max_tokens)
        import tensorrt_llm  # imported here: the torch runtime must not need it
        from tensorrt_llm.runtime import ModelRunnerCpp

        self.spec = read_head_spec(Path(engine_dir), ["reward"])
        self.vocab_size = config["pretrained_config"]["vocab_size"]
        self.rank = tensorrt_llm.mpi_rank()
        self.runner = ModelRunnerCpp.from_dir(engine_dir, rank=self.rank, gather_generation_logits=True)
        self.leader = self.rank == 0

    def read_positions(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        return [np.array([len(s) - 1]) for s in sequences]

    def plan(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> list[Step]:
        """One step: TensorRT-LLM's in-flight batching schedules the tokens itself."""
        return [Step(indices=list(range(len(sequences))), prefixes=[])] if len(sequences) else []

    def score(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """[len(sequences), N] outputs (see batching.score_all); `positions` may only name last tokens."""
        return score_all(self, sequences, positions)

    @torch.inference_mode()
    def score_step(self, sequences: list[np.ndarray], prefixes=(), positions=None) -> np.ndarray:
        """[len(sequences), N] outputs from the first generated step's logits."""
        if not self.leader:
            raise EngineError(
                f"TensorRT-LLM rank {self.rank} cannot enqueue requests: only rank 0's server scores a tensor-parallel engine;"
                " send requests to rank 0's ports"
            )
        outputs = self.runner.generate(
            [torch.from_numpy(np.asarray(s, dtype=np.int32)) for s in sequences],
            max_new_tokens=1,
            end_id=-1,  # never stop before the one step whose logits are read
            pad_id=0,
            output_generation_logits=True,
            return_dict=True,
        )
        logits = outputs["generation_logits"][:, 0, 0, : len(self.spec.names)].float().cpu().numpy()  # [B, beams, steps, vocab]
        # NVIDIA/TensorRT-LLM#2615: rows after the first came back all zero for batches > 1 on some
        # builds. A zero row is never answered as a score.
        if len(sequences) > 1 and not np.all(np.any(logits != 0, axis=1)):
            raise RuntimeError("TensorRT-LLM returned all-zero generation logits for a row (NVIDIA/TensorRT-LLM#2615)")
        return logits if self.spec.bias is None else logits + self.spec.bias


def check_input_limit(config: dict, max_tokens: int) -> None:
    """Refuses an engine (its config.json) built for shorter inputs than the server's `max_tokens` admits."""
    built = config.get("build_config", {}).get("max_input_len")
    if built is not None and max_tokens > built:
        raise ValueError(
            f"the engine was built with max_input_len {built} but max_tokens is {max_tokens}: rebuild it with "
            f'make engine ENGINE_ARGS="--max-tokens {max_tokens}", or set max_tokens to {built} or less'
        )
