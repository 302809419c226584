"""Triton python model speaking NeMo-Aligner's reward-server protocol, scored by `reward_engine`.

Input  sentences        [B, 1] BYTES  templated text, tokenized as NeMo-Aligner does (no BOS, no EOS)
       add_EOS          [B, 1] BOOL   optional, with sentences: append the tokenizer's EOS token
   or  tokens           [B, S] INT64  token ids, right-padded
       sequence_lengths [B, 1] INT64  each row's length
Output rewards          [B, N] FP32   every head output ([B, 1]: the reward, if merge_attributes)
       exceeded         [B, 1] BOOL   the row was cut to its first max_tokens tokens

Rows of all requests in a batch go to `reward_engine` together (BLS, at most 64 rows per call).
Logic of the protocol: reward_server.nemo.
"""

import traceback

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from reward_client import protocol
from reward_server import metrics, nemo
from reward_server.compat import check_numpy
from reward_server.errors import EngineError, RequestError
from reward_server.settings import Settings, model_parameters
from reward_server.tensors import pad_rows

RELEASE_AFTER_TOKENS = 1 << 16


class TritonPythonModel:
    def initialize(self, args):
        check_numpy()
        settings = Settings.for_model(args["model_repository"], model_parameters(args))
        self.tokenizer = AutoTokenizer.from_pretrained(settings.require_checkpoint())
        self.vocabulary = nemo.vocabulary(self.tokenizer, settings.require_checkpoint())
        self.max_tokens, self.max_bytes, self.merge = settings.max_tokens, settings.max_bytes, settings.merge_attributes
        # The family must outlive its metric: keep both.
        self.truncations = pb_utils.MetricFamily(metrics.TRUNCATED, "Rows cut to max_tokens", pb_utils.MetricFamily.COUNTER)
        self.truncated = self.truncations.Metric(labels={"model": args["model_name"]})
        self.outcomes = metrics.RequestOutcomes(pb_utils.MetricFamily, {"model": args["model_name"]})

    def execute(self, requests):
        responses, tokens = self._execute(requests)
        if tokens > RELEASE_AFTER_TOKENS:
            nemo.release_memory()  # a request at max_bytes must not leave its tokenizer buffers in the RSS
        return responses

    def _execute(self, requests):
        """The responses, and how many tokens the requests' rows had."""
        responses = [None] * len(requests)
        rows, owner = [], []
        for r, request in enumerate(requests):
            try:
                request_rows = nemo.request_rows(
                    self.tokenizer,
                    *(_input(request, name) for name in (nemo.SENTENCES, nemo.ADD_EOS, nemo.TOKENS, nemo.LENGTHS)),
                    max_bytes=self.max_bytes,
                    vocabulary=self.vocabulary,
                )
            except RequestError as exc:
                self.outcomes.rejected(exc.reason)
                responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
                continue
            rows += request_rows
            owner += [r] * len(request_rows)
        exceeded = np.array([[len(row) > self.max_tokens] for row in rows], dtype=bool).reshape(-1, 1)
        self.truncated.increment(int(exceeded.sum()))
        scores, errors = self._score([row[: self.max_tokens] for row in rows])
        for r in range(len(requests)):
            if responses[r] is not None:
                continue
            mine = [i for i, o in enumerate(owner) if o == r]
            failed = next((errors[i] for i in mine if errors[i] is not None), None)
            if failed is not None:
                self.outcomes.failed()  # the engine's own call failed or was refused: counted there, and here as a failure
                code = pb_utils.TritonError.INVALID_ARG if failed.invalid else pb_utils.TritonError.INTERNAL
                responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(failed), code))
                continue
            rewards = np.stack([scores[i] for i in mine]).astype(np.float32)
            outputs = [pb_utils.Tensor(nemo.REWARDS, rewards), pb_utils.Tensor(nemo.EXCEEDED, exceeded[mine])]
            responses[r] = pb_utils.InferenceResponse(output_tensors=outputs)
        return responses, sum(map(len, rows))

    def _score(self, rows):
        """Head outputs (or merged rewards) per row, and an EngineError per row (None if scored)."""
        scores, errors = [None] * len(rows), [None] * len(rows)
        output = protocol.REWARD if self.merge else protocol.ATTRIBUTES
        for start in range(0, len(rows), protocol.MAX_BATCH_SIZE):
            chunk = rows[start : start + protocol.MAX_BATCH_SIZE]
            inputs = [
                pb_utils.Tensor(protocol.INPUT_IDS, pad_rows(chunk, 0)),
                pb_utils.Tensor(protocol.NUM_TOKENS, np.array([[len(row)] for row in chunk], dtype=np.int32)),
            ]
            try:
                response = pb_utils.InferenceRequest(
                    model_name=protocol.ENGINE_MODEL, inputs=inputs, requested_output_names=[output]
                ).exec()
                if response.has_error():
                    error = response.error()
                    raise EngineError(error.message(), invalid=error.code() == pb_utils.TritonError.INVALID_ARG)
                scores[start : start + len(chunk)] = list(pb_utils.get_output_tensor_by_name(response, output).as_numpy())
            except Exception as exc:
                pb_utils.Logger.log_error(f"reward engine call failed: {traceback.format_exc()}")
                failure = exc if isinstance(exc, EngineError) else EngineError.caused_by(exc)
                errors[start : start + len(chunk)] = [failure] * len(chunk)
        return scores, errors


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
