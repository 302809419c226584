"""Client behaviour that needs no model: URL parsing, error mapping, unreachable servers."""

from __future__ import annotations

import contextlib

import pytest

from reward_client import PermissionDeniedError, Retry, RewardClient, ServerUnavailableError, Timeout
from reward_client.config import Endpoint
from tests.live_server import free_port

GOOD = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("localhost:8001", Endpoint("grpc", "localhost:8001", False)),
        ("grpc://10.0.0.1:9000", Endpoint("grpc", "10.0.0.1:9000", False)),
        ("grpcs://host:443", Endpoint("grpc", "host:443", True)),
        ("http://localhost:8000", Endpoint("http", "localhost:8000", False)),
        ("https://rm.example:8443/", Endpoint("http", "rm.example:8443", True)),
        ("http://[::1]:8000", Endpoint("http", "[::1]:8000", False)),
    ],
)
def test_endpoint_parsing(url, expected):
    assert Endpoint.parse(url) == expected


@pytest.mark.parametrize("url", ["ftp://host:1", "localhost", "http://host", "http://host:1/v2/models"])
def test_bad_urls_are_rejected(url):
    with pytest.raises(ValueError):
        Endpoint.parse(url)


@pytest.mark.parametrize("scheme", ["", "http://"])
def test_unreachable_server_raises_server_unavailable(scheme):
    url = f"{scheme}127.0.0.1:{free_port()}"
    with RewardClient(url, timeout=Timeout(connect=2, request=5), retry=Retry(attempts=1)) as client:
        assert not client.is_ready()
        with pytest.raises(ServerUnavailableError):
            client.score(GOOD)
        with pytest.raises(ServerUnavailableError):
            client.score_batch([GOOD, GOOD])


def test_score_is_the_reward_float_with_named_attributes():
    import pickle

    from reward_client import Score

    score = Score(1.5, {"helpfulness": 1.5, "verbosity": -0.25})
    assert float(score) == score.reward == 1.5
    assert score + 1 == 2.5 and sorted([Score(3.0, {}), score])[0] is score
    assert score.attributes == {"helpfulness": 1.5, "verbosity": -0.25}
    copy = pickle.loads(pickle.dumps(score))
    assert copy == 1.5 and copy.attributes == score.attributes
    assert "verbosity" in repr(score)


def test_the_client_installs_and_imports_without_torch():
    """The base distribution (no extras) is the client: its dependencies and imports leave out the server stack."""
    import subprocess
    import sys

    import tomllib

    from tests.live_server import REPO

    base = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(name in dep for dep in base for name in ("torch", "transformers", "pytriton"))
    probe = "import sys, reward_client, reward_client.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("message", "status", "expected"),
    [
        ("in ensemble 'reward_model', Stub process 'reward_engine_0_0' is not healthy.", "StatusCode.INTERNAL", "ServerUnavailableError"),
        ("Request for unknown model: 'reward_model' is not found", "400", "ServerUnavailableError"),
        ("conversation[0].role: 'model 'x' is not ready' is not one of 'system'", "400", "InvalidConversationError"),
        (
            "in ensemble 'reward_model', conversation: 5000 tokens is over the limit",
            "StatusCode.INVALID_ARGUMENT",
            "InvalidConversationError",
        ),
        ("anything", "StatusCode.CANCELLED", "ServerUnavailableError"),
        ("internal", "StatusCode.INTERNAL", "ServerError"),
        ("Internal error from Core", "StatusCode.INTERNAL", "ServerUnavailableError"),  # grpc's: the call's connection failed
        # Triton 2.51's answers to a restricted API without its key (gRPC says UNAVAILABLE): never retried.
        ("This protocol is restricted, expecting header 'triton-grpc-protocol-api-key'", "StatusCode.UNAVAILABLE", "PermissionDeniedError"),
        ("This API is restricted, expecting header 'api-key'", "403", "PermissionDeniedError"),
        ("conversation[0].content: 'This protocol is restricted' is too long", "StatusCode.INVALID_ARGUMENT", "InvalidConversationError"),
        ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", "RequestTimeoutError"),
    ],
)
def test_server_errors_map_to_retryable_or_not(message, status, expected):
    """Request text quoted in a validation error can never make it look retryable."""
    from tritonclient.utils import InferenceServerException

    from reward_client.client import convert_error

    assert type(convert_error(InferenceServerException(message, status=status))).__name__ == expected


@contextlib.contextmanager
def bare_tritonserver(folder, *flags: str):
    """A tritonserver with no models on free loopback ports (`flags` added), until the block ends."""
    import os
    import subprocess
    import sysconfig
    import time

    from reward_server.launcher.backend import tritonserver_binary

    (folder / "models").mkdir()
    http, grpc, metrics = free_port(), free_port(), free_port()
    command = [str(tritonserver_binary()), f"--model-repository={folder / 'models'}", "--model-control-mode=explicit"]
    command += [f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
    command += ["--http-address=127.0.0.1", "--grpc-address=127.0.0.1", *flags]
    env = {**os.environ, "LD_LIBRARY_PATH": sysconfig.get_config_var("LIBDIR") or ""}
    with open(folder / "log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not all(started in (folder / "log").read_bytes() for started in (b"Started GRPCInferenceService", b"Started HTTPService")):
            assert process.poll() is None and time.monotonic() < deadline, (folder / "log").read_text()[-2000:]
            time.sleep(0.1)
        yield {"grpc": f"127.0.0.1:{grpc}", "http": f"http://127.0.0.1:{http}", "process": process}
    finally:
        process.kill()  # also when stopped (SIGSTOP): SIGKILL ends a stopped process
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def restricted_server(tmp_path_factory):
    """A bare tritonserver (no models) whose inference API needs an `api-key` header."""
    restriction = "inference,health,metadata:api-key=secret"
    flags = (f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}")
    with bare_tritonserver(tmp_path_factory.mktemp("restricted"), *flags) as server:
        yield server


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_restricted_api_is_permission_denied_not_retried(restricted_server, transport):
    """Default client settings: an outage would be retried for half a minute and end in
    ServerUnavailableError; a refusal is raised at once as PermissionDeniedError."""
    with RewardClient(restricted_server[transport]) as client:
        with pytest.raises(PermissionDeniedError, match="is restricted"):
            client.score(GOOD)


def test_retry_waits_with_equal_jitter_within_known_bounds():
    retry = Retry()
    fulls = [min(retry.max_backoff, retry.backoff * 2 ** (k - 1)) for k in range(1, retry.attempts)]
    assert retry.min_wait() == sum(fulls) / 2 == 115.5  # the documented budget (README, docs/client.md)
    assert retry.delay(0) == 0.0
    for k, full in enumerate(fulls, start=1):
        waits = [retry.delay(k) for _ in range(200)]
        assert all(full / 2 <= w <= full for w in waits) and max(waits) > min(waits)
    assert Retry(attempts=1).min_wait() == 0.0
    with pytest.raises(ValueError):
        Retry(attempts=0)


def test_is_ready_is_false_within_the_timeout_when_a_server_never_answers(tmp_path):
    """A server that stops answering on an open connection (a real tritonserver, SIGSTOPped after the
    client's first call) makes is_ready False after the request timeout; it used to wait forever, and so
    kept a healthy second URL from being asked."""
    import signal
    import threading

    with bare_tritonserver(tmp_path) as server, RewardClient(server["grpc"], timeout=Timeout(connect=1, request=1)) as client:
        assert client.is_ready() is False  # the server answers: up, the model not loaded
        server["process"].send_signal(signal.SIGSTOP)
        answered = []
        asking = threading.Thread(target=lambda: answered.append(client.is_ready()), daemon=True)
        asking.start()
        asking.join(60)  # a bound on a hang, not a speed check: the timeout is 1 s
        assert answered == [False]


@pytest.mark.parametrize(
    "options",
    [{"concurrency": 0}, {"timeout": "connect"}, {"timeout": "request"}],
)
def test_settings_that_could_never_score_are_refused_at_construction(options):
    """concurrency 0 used to be accepted (every request then waited forever), as a zero timeout; a refused
    RewardClient leaves no event-loop thread behind."""
    import threading

    if "timeout" in options:
        with pytest.raises(ValueError, match=f"Timeout.{options['timeout']}"):
            Timeout(**{options["timeout"]: 0})
        return
    threads = threading.active_count()
    with pytest.raises(ValueError, match="concurrency: 0"):
        RewardClient("localhost:8001", **options)
    with pytest.raises(ValueError, match="scheme"):
        RewardClient("ftp://localhost:1")
    assert threading.active_count() == threads


@pytest.mark.parametrize("flag", [["--retries", "0"], ["--timeout", "0"], ["--concurrency", "0"]])
def test_the_cli_refuses_numbers_that_could_never_score_as_usage_errors(flag, capsys, monkeypatch):
    """Exit 2 with the reason, as for a bad URL (--retries 0 used to end in a traceback and exit 1)."""
    import io

    from reward_client.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    try:
        status = main([*flag, "score", "-"])
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    assert "Traceback" not in capsys.readouterr().err


def test_tensors_take_numpy_defaults_and_refuse_what_has_no_wire_type_before_sending():
    """int64 (numpy's default) and bytes arrays are sent as INT32 and BYTES; a float array, an id beyond
    INT32 and text that UTF-8 cannot encode are InvalidConversationError, before anything is sent (they
    were a KeyError reported as a ServerError, and a raw UnicodeEncodeError)."""
    import numpy as np

    from reward_client import InvalidConversationError
    from reward_client.client import _wire_array
    from reward_client.inputs import text_inputs

    ids = _wire_array("TOKENS", np.array([[1, 2, 3]]))
    assert ids.dtype == np.int32 and ids.tolist() == [[1, 2, 3]]
    assert _wire_array("TEXT", np.array([[b"hi"]])).dtype == np.object_
    for name, value in (("TOKENS", np.array([[2**31]])), ("TOKENS", np.array([[1.5]]))):
        with pytest.raises(InvalidConversationError, match=name):
            _wire_array(name, value)
    with pytest.raises(InvalidConversationError, match="lone surrogate") as caught:
        text_inputs("bad \ud800")
    assert caught.value.reason == "encoding"


def test_a_refusal_by_the_server_says_so_in_its_reason():
    from tritonclient.utils import InferenceServerException

    from reward_client.client import convert_error

    error = convert_error(InferenceServerException("conversation: 5000 tokens is over the limit", status="StatusCode.INVALID_ARGUMENT"))
    assert error.reason == "server"


def test_per_turn_scores_are_one_per_assistant_turn_a_nan_kept_in_its_place(monkeypatch):
    """A NaN the model computed for a turn is that turn's score, not padding (it was dropped: three turns in, two
    scores out, the third turn's score in the second's place)."""
    import asyncio
    import math

    import numpy as np

    from reward_client import AsyncRewardClient, protocol

    nan = float("nan")
    answer = {
        protocol.TURN_REWARDS: np.array([[0.5, nan, 0.7, nan]], dtype=np.float32),  # padded to another row's 4 turns
        protocol.TURN_ATTRIBUTES: np.array([[[0.5], [nan], [0.7], [nan]]], dtype=np.float32),
        protocol.ATTRIBUTE_NAMES: np.array([[b"reward"]], dtype=np.object_),
    }
    result = type("Result", (), {"as_numpy": lambda self, name: answer[name]})()

    async def request(*args, **kwargs):
        return result

    client = AsyncRewardClient("localhost:1")
    monkeypatch.setattr(client, "_request", request)
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 3
    scores = asyncio.run(client.score_turns(conversation))
    assert [s.reward for s in scores[::2]] == [0.5, np.float32(0.7)] and len(scores) == 3 and math.isnan(scores[1].reward)
