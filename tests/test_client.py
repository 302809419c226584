"""Client behaviour that needs no model: URL parsing, error mapping, unreachable servers."""

from __future__ import annotations

import pytest

from reward_client import RewardClient, ServerUnavailableError, Timeout
from reward_client.config import Endpoint

from live_server import free_port

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
    with RewardClient(url, timeout=Timeout(connect=2, request=5)) as client:
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

    from conftest import REPO

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
    ],
)
def test_server_errors_map_to_retryable_or_not(message, status, expected):
    """Request text quoted in a validation error can never make it look retryable."""
    from tritonclient.utils import InferenceServerException

    from reward_client.client import convert_error

    assert type(convert_error(InferenceServerException(message, status=status))).__name__ == expected
