"""Triton python model: token ids -> LM trunk -> reward head -> scores.

Input  INPUT_IDS       [B, L]    INT32  (ragged across requests: each request keeps its own length)
       NUM_TOKENS      [B, 1]    INT32  real length of each row
       SCORE_AT        [B, T]    INT32  optional: positions where scores are read, -1 padded (default: last token)
Output REWARD          [B, 1]    FP32   the head's reward rule at the final read position
       ATTRIBUTES      [B, N]    FP32   all N head outputs there
       ATTRIBUTE_NAMES [B, N]    BYTES  their names
       TURN_REWARDS    [B, T]    FP32   the reward at every read position (NaN padded)
       TURN_ATTRIBUTES [B, T, N] FP32   all head outputs at every read position (NaN padded)

All sequences of all requests in a dynamic batch are scored together (packed, no padding),
then each request gets its own response.
"""

import json
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from reward_client import protocol

from batching import run_steps
from engine_metrics import EngineMetrics


class TritonPythonModel:
    def initialize(self, args):
        parameters = protocol.read_parameters(json.loads(args["model_config"]))
        checkpoint = protocol.resolve_checkpoint(parameters.get("checkpoint", ""), args["model_repository"])
        runtime = protocol.resolve_runtime(parameters.get("runtime", ""))
        if runtime == "tensorrt_llm":
            from trtllm_runtime import TrtllmRewardEngine  # needs tensorrt_llm and a GPU

            self.engine = TrtllmRewardEngine(checkpoint)
        else:
            from torch_runtime import TorchRewardEngine  # needs transformers 5 (the trtllm container pins 4.x)

            step_tokens = parameters.get("max_step_tokens", "auto")
            self.engine = TorchRewardEngine(
                checkpoint,
                device=parameters.get("device", "auto"),
                dtype=parameters.get("dtype", "auto"),
                max_step_tokens=None if step_tokens == "auto" else protocol.parse_int(step_tokens, "max_step_tokens"),
                min_shared_prefix=protocol.parse_int(parameters.get("min_shared_prefix", "64"), "min_shared_prefix", minimum=0),
            )
        self.max_tokens = protocol.parse_int(parameters.get("max_tokens", "4096"), "max_tokens")
        self.names = np.array([name.encode() for name in self.engine.head.names], dtype=np.object_)
        self.metrics = EngineMetrics(args["model_name"], self.engine.head.names)

    def execute(self, requests):
        """Scores every row of every request in token-budget steps, shortest first, and answers
        each request as soon as its last row is scored: short requests do not wait for long ones.
        A failing step fails only the requests with rows in it."""
        sequences, reads, owner = [], [], []
        for r, request in enumerate(requests):
            try:
                rows, positions = self._rows(request)
            except ValueError as exc:
                _send(request, pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
                continue
            sequences += rows
            reads += positions
            owner += [r] * len(rows)
        reads = self.engine.read_positions(sequences, reads)
        outputs = [None] * len(sequences)  # row i's head outputs [reads, N]
        rows_left = np.bincount(owner, minlength=len(requests))
        answered = set()
        for result in run_steps(self.engine, sequences, reads):
            if result.error is None:
                self.metrics.step([len(sequences[i]) for i in result.indices], result.computed, result.prefixes, result.seconds)
                for i, output in zip(result.indices, result.outputs, strict=True):
                    outputs[i] = output
            else:
                pb_utils.Logger.log_error(f"reward engine failed: {''.join(traceback.format_exception(result.error))}")
            for i in result.indices:
                rows_left[owner[i]] -= 1
            for r in {owner[i] for i in result.indices} - answered:
                if result.error is not None:
                    response = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"reward engine failed: {type(result.error).__name__}")
                    )
                elif rows_left[r] == 0:
                    rows = [outputs[i] for i, o in enumerate(owner) if o == r]
                    response = self._response(rows)
                    self.metrics.scored(np.stack([row[-1] for row in rows]))
                else:
                    continue  # rows of this request still wait in later steps
                _send(requests[r], response)
                answered.add(r)
        return None

    def _rows(self, request):
        """Token-id rows and read positions of one request; ValueError (INVALID_ARG) names what is
        wrong, since the engine is callable directly, not only behind preprocessing."""
        ids = pb_utils.get_input_tensor_by_name(request, protocol.INPUT_IDS).as_numpy()
        lengths = pb_utils.get_input_tensor_by_name(request, protocol.NUM_TOKENS).as_numpy().reshape(-1)
        rows = []
        for b, length in enumerate(lengths):
            if not 1 <= length <= min(ids.shape[1], self.max_tokens):
                raise ValueError(f"row {b}: {protocol.NUM_TOKENS} {length} is not between 1 and {min(ids.shape[1], self.max_tokens)}")
            row = ids[b, :length]
            if row.min() < 0 or row.max() >= self.engine.vocab_size:
                raise ValueError(f"row {b}: token ids must lie in [0, {self.engine.vocab_size})")
            rows.append(row)
        score_at = pb_utils.get_input_tensor_by_name(request, protocol.SCORE_AT)
        if score_at is None:
            return rows, [np.array([len(row) - 1]) for row in rows]
        reads = [positions[positions >= 0] for positions in score_at.as_numpy()]
        for b, (row, positions) in enumerate(zip(rows, reads, strict=True)):
            if not len(positions) or positions[-1] >= len(row) or np.any(np.diff(positions) <= 0):
                raise ValueError(f"row {b}: {protocol.SCORE_AT} must list ascending positions below its {len(row)} tokens")
            if (len(positions) > 1 or positions[-1] != len(row) - 1) and not self.engine.supports_turns:
                raise ValueError("per-turn scores need the torch runtime (this engine reads only the last token)")
        return rows, reads

    def _response(self, outputs):
        """One request's response from each row's head outputs [T_row, N]."""
        turns = protocol.pad_rows(outputs, np.nan)  # [B, T, N]
        tensors = {
            protocol.REWARD: np.array([[self.engine.head.reward(o[-1])] for o in outputs], dtype=np.float32),
            protocol.ATTRIBUTES: np.stack([o[-1] for o in outputs]),
            protocol.ATTRIBUTE_NAMES: np.tile(self.names, (len(outputs), 1)),
            protocol.TURN_REWARDS: self.engine.head.reward(turns).astype(np.float32),
            protocol.TURN_ATTRIBUTES: turns,
        }
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value) for name, value in tensors.items()])


def _send(request, response):
    request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
