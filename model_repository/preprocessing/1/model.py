"""Triton python model: JSON conversation -> chat-templated token ids.

Input  CONVERSATION [B, 1] BYTES  one UTF-8 JSON conversation per row
       SCORE_TURNS  [B, 1] BOOL   optional: score every assistant turn, not only the last
Output INPUT_IDS    [B, L] INT32  token ids, rows right-padded to the longest
       NUM_TOKENS   [B, 1] INT32  each row's real length
       SCORE_AT     [B, T] INT32  positions where scores are read (turn ends), -1 padded
"""

import json
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from reward_client import protocol
from reward_client.errors import REJECTION_REASONS, InvalidConversationError

from templating import ChatTokenizer


class TritonPythonModel:
    def initialize(self, args):
        parameters = protocol.read_parameters(json.loads(args["model_config"]))
        checkpoint = protocol.resolve_checkpoint(parameters.get("checkpoint", ""), args["model_repository"])
        self.tokenizer = ChatTokenizer(
            checkpoint,
            max_tokens=protocol.parse_int(parameters.get("max_tokens", "4096"), "max_tokens"),
            max_bytes=protocol.parse_int(parameters.get("max_bytes", str(1 << 20)), "max_bytes"),
            max_turns=protocol.parse_int(parameters.get("max_turns", "256"), "max_turns"),
        )
        self.pad_id = self.tokenizer.tokenizer.pad_token_id or 0
        # The family must outlive its metrics: keep both.
        self.rejections = pb_utils.MetricFamily(protocol.METRIC_REJECTED, "Requests rejected, by reason", pb_utils.MetricFamily.COUNTER)
        labels = {"model": args["model_name"]}
        self.rejected = {reason: self.rejections.Metric(labels={**labels, "reason": reason}) for reason in REJECTION_REASONS}

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            payloads = pb_utils.get_input_tensor_by_name(request, protocol.CONVERSATION).as_numpy().reshape(-1)
            turns = pb_utils.get_input_tensor_by_name(request, protocol.SCORE_TURNS)
            all_turns = np.zeros(len(payloads), dtype=bool) if turns is None else turns.as_numpy().reshape(-1)
            rows, reads = zip(*(self.tokenizer.encode(p, bool(t)) for p, t in zip(payloads, all_turns, strict=True)), strict=True)
        except InvalidConversationError as exc:
            self.rejected[exc.reason].increment(1)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        except Exception as exc:
            pb_utils.Logger.log_error(f"preprocessing failed: {traceback.format_exc()}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocessing failed: {type(exc).__name__}"))
        lengths = np.array([[len(row)] for row in rows], dtype=np.int32)
        outputs = {
            protocol.INPUT_IDS: protocol.pad_rows(rows, self.pad_id),
            protocol.NUM_TOKENS: lengths,
            protocol.SCORE_AT: protocol.pad_rows(reads, -1),
        }
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()])
