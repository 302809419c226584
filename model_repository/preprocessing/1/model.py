"""Triton python model: JSON conversation -> chat-templated token ids (logic: reward_server.templating).

Input  CONVERSATION [B, 1] BYTES  one UTF-8 JSON conversation per row
       SCORE_TURNS  [B, 1] BOOL   optional: score every assistant turn, not only the last
       or TEXT [B, 1] BYTES / TOKENS [B, L] INT32 instead of CONVERSATION, with the optional
       ADD_SPECIAL_TOKENS [B, 1] BOOL and KEEP_LAST_TOKENS [B, 1] INT32 (logic: reward_server.inputs)
Output INPUT_IDS    [B, L] INT32  token ids, rows right-padded to the longest
       NUM_TOKENS   [B, 1] INT32  each row's real length
       SCORE_AT     [B, T] INT32  positions where scores are read (turn ends), -1 padded
"""

import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from reward_client import protocol
from reward_server import metrics
from reward_server.compat import check_numpy
from reward_server.errors import RequestError
from reward_server.inputs import Inputs
from reward_server.settings import Settings, model_parameters
from reward_server.templating import ChatTokenizer
from reward_server.tensors import pad_rows

INPUTS = (
    protocol.CONVERSATION,
    protocol.SCORE_TURNS,
    protocol.TEXT,
    protocol.TOKENS,
    protocol.ADD_SPECIAL_TOKENS,
    protocol.KEEP_LAST_TOKENS,
)


class TritonPythonModel:
    def initialize(self, args):
        check_numpy()
        settings = Settings.for_model(args["model_repository"], model_parameters(args))
        self.tokenizer = ChatTokenizer(
            str(settings.require_checkpoint()), max_tokens=settings.max_tokens, max_bytes=settings.max_bytes, max_turns=settings.max_turns
        )
        self.inputs = Inputs(self.tokenizer)
        self.pad_id = self.tokenizer.tokenizer.pad_token_id or 0
        self.outcomes = metrics.RequestOutcomes(pb_utils.MetricFamily, {"model": args["model_name"]})

    def execute(self, requests):
        """The requests Triton batched, their texts tokenized in one call (Inputs.encode_requests); each
        answered with its own rows or its own error."""
        tensors = [{name: _numpy(pb_utils.get_input_tensor_by_name(request, name)) for name in INPUTS} for request in requests]
        return [self._respond(encoded) for encoded in self.inputs.encode_requests(tensors)]

    def _respond(self, encoded):
        if isinstance(encoded, RequestError):
            self.outcomes.rejected(encoded.reason)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(encoded), pb_utils.TritonError.INVALID_ARG))
        if isinstance(encoded, Exception):
            self.outcomes.failed()
            pb_utils.Logger.log_error(f"preprocessing failed: {''.join(traceback.format_exception(encoded))}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocessing failed: {type(encoded).__name__}"))
        rows, reads = zip(*encoded, strict=True)
        outputs = {
            protocol.INPUT_IDS: pad_rows(rows, self.pad_id),
            protocol.NUM_TOKENS: np.array([[len(row)] for row in rows], dtype=np.int32),
            protocol.SCORE_AT: pad_rows(reads, -1),
        }
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()])


def _numpy(tensor):
    return None if tensor is None else tensor.as_numpy()
