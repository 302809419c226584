"""reward_engine/1/model.py's execute with a stand-in for Triton's python-backend API (pb_utils), for what a
real tritonserver cannot be made to do on demand: a response sender whose send raises (python_backend
raises when the server could not take the response)."""

from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from reward_client import protocol
from reward_server import metrics
from reward_server.runtimes.torch_runtime import TorchRewardEngine
from tests.live_server import REPO

ENGINE_MODEL = REPO / "model_repository" / "reward_engine" / "1"


class _Sender:
    def __init__(self, request):
        self.request = request

    def send(self, response, flags=0):
        if self.request.refuses_sends:
            raise RuntimeError("An error occurred while sending a response.")
        self.request.sent.append(response)


class _Request:
    def __init__(self, tensors: dict[str, np.ndarray], refuses_sends: bool = False):
        self.tensors, self.refuses_sends, self.sent = tensors, refuses_sends, []

    def get_response_sender(self):
        return _Sender(self)


def _stand_in_pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.logged = []

    class TritonError(Exception):
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code=None):
            super().__init__(message)
            self.code = code

    pb.counted = {}  # (family name, sorted labels) -> what its counter was incremented by

    class Metric:
        def __init__(self, key):
            self.key = key
            pb.counted.setdefault(key, 0)

        def increment(self, value):
            pb.counted[self.key] += value

        observe = set = lambda self, value: None

    class MetricFamily:
        COUNTER, HISTOGRAM, GAUGE = "counter", "histogram", "gauge"

        def __init__(self, name, *args):
            self.name = name

        def Metric(self, labels, buckets=None):
            return Metric((self.name, tuple(sorted(labels.items()))))

    pb.TritonError, pb.MetricFamily = TritonError, MetricFamily
    pb.InferenceResponse = lambda output_tensors=None, error=None: SimpleNamespace(outputs=output_tensors, error=error)
    pb.Tensor = lambda name, value: SimpleNamespace(name=name, value=value, as_numpy=lambda: value)
    pb.Logger = SimpleNamespace(log_error=pb.logged.append)
    pb.get_input_tensor_by_name = lambda request, name: None if name not in request.tensors else pb.Tensor(name, request.tensors[name])
    return pb


@pytest.fixture
def model(checkpoint, monkeypatch):
    pb = _stand_in_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    for name in ("engine_metrics", "model"):  # model.py imports engine_metrics, its neighbour, by that name
        spec = importlib.util.spec_from_file_location(name, ENGINE_MODEL / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)  # both gone again after the test
        spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.engine = TorchRewardEngine(str(checkpoint), device="cpu", max_step_tokens=64)  # rows of 40 and 50: two steps
    model.settings, model.loop = SimpleNamespace(max_tokens=4096), None
    model.metrics = module.EngineMetrics("reward_engine", "reward_engine_0", model.engine.spec.names)
    return model, pb


def _request(tokens: int, refuses_sends: bool = False, length: int | None = None) -> _Request:
    ids = np.random.default_rng(tokens).integers(0, 128_000, (1, tokens)).astype(np.int32)
    return _Request({protocol.INPUT_IDS: ids, protocol.NUM_TOKENS: np.array([[length or tokens]], dtype=np.int32)}, refuses_sends)


def test_an_answer_that_cannot_be_sent_costs_no_other_request_its_answer(model):
    """A refused request and an early step's answer, each sent through a sender that raises, are logged;
    the batch's other request still gets its score (execute used to raise: Triton failed the whole batch)."""
    model, pb = model
    refused, early, last = _request(10, refuses_sends=True, length=0), _request(40, refuses_sends=True), _request(50)
    returned = model.execute([refused, early, last])
    assert returned[:2] == [None, None] and returned[2].error is None
    (reward,) = [t.value for t in returned[2].outputs if t.name == protocol.REWARD]
    assert reward[0, 0] == model.engine.score([last.tensors[protocol.INPUT_IDS][0]])[0, 0]
    assert len([line for line in pb.logged if "an answer could not be sent" in line]) == 2


def test_failed_and_refused_requests_are_counted_by_outcome(model, monkeypatch):
    """Triton counts a python model's error answers as successes: the engine counts its own, a refused request
    under its reason and one whose step failed as a failure (none of the batch's other requests)."""
    model, pb = model
    labels = (("engine_instance", "reward_engine_0"), ("model", "reward_engine"))
    failed, refused = (metrics.FAILED, labels), (metrics.REJECTED, (*labels, ("reason", "tensors")))
    score_step = model.engine.score_step

    def failing_for_the_40_token_row(sequences, *args, **kwargs):
        if any(len(s) == 40 for s in sequences):
            raise RuntimeError("CUDA out of memory")
        return score_step(sequences, *args, **kwargs)

    monkeypatch.setattr(model.engine, "score_step", failing_for_the_40_token_row)
    refused_request, failing, last = _request(10), _request(40), _request(50)
    refused_request.tensors[protocol.INPUT_IDS][0, 3] = model.engine.vocab_size  # an id beyond the vocabulary
    returned = model.execute([refused_request, failing, last])  # the 40-token row's step answers through its sender
    assert refused_request.sent[0].error.code == "INVALID_ARG" and failing.sent[0].error.code == "INTERNAL"
    assert returned[2].error is None and pb.counted[failed] == 1 and pb.counted[refused] == 1
    assert sum(n for (name, _), n in pb.counted.items() if name in (metrics.FAILED, metrics.REJECTED)) == 2
    assert pb.counted[(metrics.TOKENS, labels)] == 50  # the scored request's tokens only
