"""Triton python model: token ids -> LM trunk -> reward head -> scores (logic: reward_server.scoring).

Input  INPUT_IDS       [B, L]    INT32  (ragged across requests: each request keeps its own length)
       NUM_TOKENS      [B, 1]    INT32  real length of each row
       SCORE_AT        [B, T]    INT32  optional: positions where scores are read, -1 padded (default: last token)
Output REWARD          [B, 1]    FP32   the head's reward rule at the final read position
       ATTRIBUTES      [B, N]    FP32   all N head outputs there
       ATTRIBUTE_NAMES [B, N]    BYTES  their names
       TURN_REWARDS    [B, T]    FP32   the reward at every read position (NaN padded)
       TURN_ATTRIBUTES [B, T, N] FP32   all head outputs at every read position (NaN padded)

All rows of all requests in a dynamic batch are scored together (packed, no padding). A request answered
by one of the batch's earlier steps is answered at once through its response sender; those of the last
step, in the list execute returns (one message to Triton for all; None where a request was answered
already). With `scoring_thread`, `execute` reads and checks the requests and hands them to a scoring
thread (reward_server.scoring_loop), so that the next batch is read while a step runs; it answers each
request through its response sender.
"""

import traceback

import triton_python_backend_utils as pb_utils
from engine_metrics import EngineMetrics

from reward_client import protocol
from reward_server import scoring
from reward_server.compat import check_numpy
from reward_server.errors import RequestError
from reward_server.instances import check_count, engine_instance
from reward_server.runtimes import load_engine
from reward_server.scoring_loop import ScoringLoop
from reward_server.settings import Settings, model_parameters


class TritonPythonModel:
    def initialize(self, args):
        check_numpy()
        self.settings = Settings.for_model(args["model_repository"], model_parameters(args))
        instance = engine_instance(args)
        check_count(self.settings.engine_instances, instance)
        self.engine = load_engine(self.settings, instance.index)
        self.metrics = EngineMetrics(args["model_name"], instance.name, self.engine.spec.names)
        self.loop = ScoringLoop(self.engine, self._answer, self.metrics.step) if self.settings.scoring_thread else None

    def execute(self, requests):
        handles, batch, places = [], [], []
        for place, request in enumerate(requests):
            try:
                batch.append(scoring.request_rows(self.engine, self.settings.max_tokens, *_inputs(request)))
                handles.append(request)
                places.append(place)
            except RequestError as exc:
                self.metrics.outcomes.rejected(exc.reason)
                _send(request, pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
        if self.loop is not None:
            self.loop.submit(handles, batch)
            return None
        # Answers of the batch's last step go back in execute's list: one message to Triton for all of them
        # instead of a round trip each (a response sender's send waits for Triton to take it). Requests
        # answered by earlier steps go at once (short ones need not wait for long ones); None: answered already.
        returned = [None] * len(requests)
        for answer in scoring.answers(self.engine, batch, self.metrics.step):
            if answer.last_step:
                returned[places[answer.request]] = self._response(answer)
            else:
                self._answer(handles[answer.request], answer)
        return returned

    def finalize(self):
        if self.loop is not None:
            self.loop.close()

    def _answer(self, request, answer):
        """One request's answer sent at once (from the scoring thread, with one)."""
        _send(request, self._response(answer))

    def _response(self, answer):
        if answer.error is not None:
            self.metrics.outcomes.failed()
            pb_utils.Logger.log_error(f"{answer.error}: {''.join(traceback.format_exception(answer.error.__cause__))}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(answer.error), pb_utils.TritonError.INTERNAL))
        self.metrics.scored(answer.outputs[protocol.ATTRIBUTES])
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in answer.outputs.items()])


def _inputs(request):
    score_at = pb_utils.get_input_tensor_by_name(request, protocol.SCORE_AT)
    return (
        pb_utils.get_input_tensor_by_name(request, protocol.INPUT_IDS).as_numpy(),
        pb_utils.get_input_tensor_by_name(request, protocol.NUM_TOKENS).as_numpy(),
        None if score_at is None else score_at.as_numpy(),
    )


def _send(request, response):
    """One answer through the request's response sender. A send Triton refuses (python_backend raises when
    the server could not take the response) is logged: it must not cost the batch's other requests theirs."""
    try:
        request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception as exc:
        pb_utils.Logger.log_error(f"reward engine: an answer could not be sent: {exc!r}")
