"""Triton python model: token ids -> LM trunk -> reward head -> REWARD.

Input  INPUT_IDS  [B, L] INT32  (ragged across requests: each request keeps its own length)
       NUM_TOKENS [B, 1] INT32  real length of each row
Output REWARD     [B, 1] FP32

All sequences of all requests in a dynamic batch are scored together (packed, no padding),
then each request gets its own response.
"""

import json
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from reward_client import protocol

from torch_runtime import TorchRewardEngine


class TritonPythonModel:
    def initialize(self, args):
        parameters = protocol.read_parameters(json.loads(args["model_config"]))
        checkpoint = protocol.resolve_checkpoint(parameters.get("checkpoint", ""), args["model_repository"])
        runtime = parameters.get("runtime", "torch")
        if runtime != "torch":
            raise ValueError(f"parameter runtime: {runtime!r} is not supported by this build (use torch)")
        step_tokens = parameters.get("max_step_tokens", "auto")
        self.engine = TorchRewardEngine(
            checkpoint,
            device=parameters.get("device", "auto"),
            dtype=parameters.get("dtype", "auto"),
            max_step_tokens=None if step_tokens == "auto" else protocol.parse_int(step_tokens, "max_step_tokens"),
            min_shared_prefix=protocol.parse_int(parameters.get("min_shared_prefix", "64"), "min_shared_prefix", minimum=0),
        )

    def execute(self, requests):
        """Scores every row of every request in token-budget steps, shortest first, and answers
        each request as soon as its last row is scored: short requests do not wait for long ones.
        A failing step fails only the requests with rows in it."""
        rows_per_request = [self._rows(request) for request in requests]
        sequences, owner = [], []
        for r, rows in enumerate(rows_per_request):
            sequences += rows
            owner += [r] * len(rows)
        rewards = np.zeros((len(sequences), 1), dtype=np.float32)
        rows_left = [len(rows) for rows in rows_per_request]
        first_row = np.cumsum([0, *rows_left])  # request r owns rows first_row[r]:first_row[r + 1]
        answered = set()
        for step in self.engine.plan(sequences):
            try:
                rewards[step.indices] = self.engine.score_step([sequences[i] for i in step.indices], step.prefixes)[:, :1]
                error = None
            except Exception as exc:
                pb_utils.Logger.log_error(f"reward engine failed: {traceback.format_exc()}")
                error = pb_utils.TritonError(f"reward engine failed: {type(exc).__name__}")
            for i in step.indices:
                rows_left[owner[i]] -= 1
            for r in {owner[i] for i in step.indices} - answered:
                if error:
                    response = pb_utils.InferenceResponse(error=error)
                elif rows_left[r] == 0:
                    scores = rewards[first_row[r] : first_row[r + 1]]
                    response = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(protocol.REWARD, scores)])
                else:
                    continue  # rows of this request still wait in later steps
                requests[r].get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                answered.add(r)
        return None

    @staticmethod
    def _rows(request):
        ids = pb_utils.get_input_tensor_by_name(request, protocol.INPUT_IDS).as_numpy()
        lengths = pb_utils.get_input_tensor_by_name(request, protocol.NUM_TOKENS).as_numpy().reshape(-1)
        return [ids[b, : lengths[b]] for b in range(ids.shape[0])]
