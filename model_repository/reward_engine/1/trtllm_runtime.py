"""The `tensorrt_llm` runtime: a TensorRT-LLM engine built by `make engine`, head folded into lm_head.

TensorRT-LLM returns no hidden states (NVIDIA/TensorRT-LLM#4414), so build/trtllm_checkpoint.py puts
the reward head in rows 0..N-1 of a full-vocabulary lm_head; one generated step's logits (engine
built with --gather_generation_logits, --logits_dtype float32) are the logits at the last prompt
token, and their first N entries, plus reward_head.json's bias, are the head's outputs. Context
logits are never gathered (~2 GB per 4,096-token request at a 128k vocabulary).

Written against TensorRT-LLM 1.0's `ModelRunnerCpp` (runtime/model_runner_cpp.py); it only runs
where `tensorrt_llm` and a GPU exist, which none of this project's test machines have: UNVERIFIED.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from batching import Step, score_all
from head_spec import read_head_spec


class TrtllmRewardEngine:
    """Same interface as TorchRewardEngine (`plan`, `score_step`, `read_positions`, `head`)."""

    supports_turns = False  # generation logits exist only at the last prompt token

    def __init__(self, engine_dir: str) -> None:
        from tensorrt_llm.runtime import ModelRunnerCpp  # imported here: the torch runtime must not need it

        self.head = read_head_spec(Path(engine_dir), ["reward"])
        self.vocab_size = json.loads((Path(engine_dir) / "config.json").read_text())["pretrained_config"]["vocab_size"]
        self.runner = ModelRunnerCpp.from_dir(engine_dir, gather_generation_logits=True)

    def read_positions(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        return [np.array([len(s) - 1]) for s in sequences]

    def plan(self, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray] | None = None) -> list[Step]:
        """One step: TensorRT-LLM's in-flight batching schedules the tokens itself."""
        return [Step(indices=list(range(len(sequences))), prefixes=[])] if len(sequences) else []

    def score(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        """[len(sequences), N] outputs (see batching.score_all)."""
        return score_all(self, sequences)

    @torch.inference_mode()
    def score_step(self, sequences: list[np.ndarray], prefixes=(), positions=None) -> np.ndarray:
        """[len(sequences), N] outputs from the first generated step's logits."""
        outputs = self.runner.generate(
            [torch.from_numpy(np.asarray(s, dtype=np.int32)) for s in sequences],
            max_new_tokens=1,
            end_id=-1,  # never stop before the one step whose logits are read
            pad_id=0,
            output_generation_logits=True,
            return_dict=True,
        )
        logits = outputs["generation_logits"][:, 0, 0, : len(self.head.names)].float().cpu().numpy()  # [B, beams, steps, vocab]
        # NVIDIA/TensorRT-LLM#2615: rows after the first came back all zero for batches > 1 on some
        # builds. A zero row is never answered as a score.
        if len(sequences) > 1 and not np.all(np.any(logits != 0, axis=1)):
            raise RuntimeError("TensorRT-LLM returned all-zero generation logits for a row (NVIDIA/TensorRT-LLM#2615)")
        return logits if self.head.bias is None else logits + self.head.bias
