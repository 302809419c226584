"""Triton python model speaking NeMo-Aligner's reward-server protocol, scored by `reward_engine`.

Input  sentences        [B, 1] BYTES  templated text, tokenized as NeMo-Aligner does (no BOS, no EOS)
       add_EOS          [B, 1] BOOL   optional, with sentences: append the tokenizer's EOS token
   or  tokens           [B, S] INT64  token ids, right-padded
       sequence_lengths [B, 1] INT64  each row's length
Output rewards          [B, N] FP32   every head output ([B, 1]: the reward, if merge_attributes)
       exceeded         [B, 1] BOOL   the row was cut to its first max_tokens tokens

Rows of all requests in a batch go to `reward_engine` together (BLS, at most 64 rows per call).
"""

import json
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer

from reward_client import protocol

SENTENCES, ADD_EOS, TOKENS, LENGTHS = "sentences", "add_EOS", "tokens", "sequence_lengths"
REWARDS, EXCEEDED = "rewards", "exceeded"


class TritonPythonModel:
    def initialize(self, args):
        parameters = protocol.read_parameters(json.loads(args["model_config"]))
        checkpoint = protocol.resolve_checkpoint(parameters.get("checkpoint", ""), args["model_repository"])
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.max_tokens = protocol.parse_int(parameters.get("max_tokens", "4096"), "max_tokens")
        self.merge = protocol.parse_bool(parameters.get("merge_attributes", "false"), "merge_attributes")
        # The family must outlive its metric: keep both.
        self.truncations = pb_utils.MetricFamily(protocol.METRIC_TRUNCATED, "Rows cut to max_tokens", pb_utils.MetricFamily.COUNTER)
        self.truncated = self.truncations.Metric(labels={"model": args["model_name"]})

    def execute(self, requests):
        responses = [None] * len(requests)
        rows, owner = [], []
        for r, request in enumerate(requests):
            try:
                request_rows = self._rows(request)
            except ValueError as exc:
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
            if any(errors[i] for i in mine):
                responses[r] = pb_utils.InferenceResponse(error=pb_utils.TritonError(next(errors[i] for i in mine if errors[i])))
                continue
            rewards = np.stack([scores[i] for i in mine]).astype(np.float32)
            outputs = [pb_utils.Tensor(REWARDS, rewards), pb_utils.Tensor(EXCEEDED, exceeded[mine])]
            responses[r] = pb_utils.InferenceResponse(output_tensors=outputs)
        return responses

    def _rows(self, request):
        """Token-id rows of one request; ValueError names what is wrong with it."""
        sentences = pb_utils.get_input_tensor_by_name(request, SENTENCES)
        tokens = pb_utils.get_input_tensor_by_name(request, TOKENS)
        lengths = pb_utils.get_input_tensor_by_name(request, LENGTHS)
        if (sentences is None) == (tokens is None):
            raise ValueError(f"send either '{SENTENCES}' or '{TOKENS}' with '{LENGTHS}'")
        if sentences is not None:
            texts = sentences.as_numpy().reshape(-1)
            add_eos = pb_utils.get_input_tensor_by_name(request, ADD_EOS)
            add_eos = np.zeros(len(texts), dtype=bool) if add_eos is None else add_eos.as_numpy().reshape(-1)
            rows = []
            for b, (text, eos) in enumerate(zip(texts, add_eos, strict=True)):
                try:
                    ids = self.tokenizer(text.decode("utf-8"), add_special_tokens=False).input_ids
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{SENTENCES}[{b}]: not valid UTF-8 (byte {exc.start})") from None
                if eos and self.tokenizer.eos_token_id is None:
                    raise ValueError(f"{ADD_EOS}: this checkpoint's tokenizer has no EOS token")
                rows.append(np.array(ids + [self.tokenizer.eos_token_id] * bool(eos), dtype=np.int32))
        else:
            if lengths is None:
                raise ValueError(f"'{TOKENS}' needs '{LENGTHS}'")
            ids, counts = tokens.as_numpy(), lengths.as_numpy().reshape(-1)
            if ids.ndim != 2 or len(counts) != ids.shape[0] or np.any(counts < 1) or np.any(counts > ids.shape[1]):
                raise ValueError(f"'{LENGTHS}' must give one length per '{TOKENS}' row, each between 1 and {ids.shape[-1]}")
            rows = [ids[b, : counts[b]] for b in range(len(counts))]  # the padding is not looked at
            vocabulary = len(self.tokenizer)
            for b, row in enumerate(rows):
                if row.min() < 0 or row.max() >= vocabulary:
                    raise ValueError(f"'{TOKENS}' row {b}: ids must lie in [0, {vocabulary})")
            rows = [row.astype(np.int32) for row in rows]
        for b, row in enumerate(rows):
            if not len(row):
                raise ValueError(f"row {b}: nothing to score (0 tokens)")
        return rows

    def _score(self, rows):
        """Head outputs (or merged rewards) per row, and an error message per row (None if scored)."""
        scores, errors = [None] * len(rows), [None] * len(rows)
        output = protocol.REWARD if self.merge else protocol.ATTRIBUTES
        for start in range(0, len(rows), protocol.MAX_BATCH_SIZE):
            chunk = rows[start : start + protocol.MAX_BATCH_SIZE]
            inputs = [
                pb_utils.Tensor(protocol.INPUT_IDS, protocol.pad_rows(chunk, 0)),
                pb_utils.Tensor(protocol.NUM_TOKENS, np.array([[len(row)] for row in chunk], dtype=np.int32)),
            ]
            try:
                response = pb_utils.InferenceRequest(
                    model_name=protocol.ENGINE_MODEL, inputs=inputs, requested_output_names=[output]
                ).exec()
                if response.has_error():
                    raise RuntimeError(response.error().message())
                values = pb_utils.get_output_tensor_by_name(response, output).as_numpy()
                scores[start : start + len(chunk)] = list(values)
            except Exception as exc:
                pb_utils.Logger.log_error(f"reward engine call failed: {traceback.format_exc()}")
                message = str(exc) if str(exc).startswith("reward engine failed") else f"reward engine failed: {exc}"
                errors[start : start + len(chunk)] = [message] * len(chunk)
        return scores, errors
