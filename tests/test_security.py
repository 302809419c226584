"""Locked-down defaults: no model control without a key, TLS on both protocols, templates that never
run request text."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from reward_client import Retry, RewardClient, RewardClientError, ServerUnavailableError
from tests.live_server import session_processes, start_server, stop_server

GOOD = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
ADMIN_KEY = "s3cret-admin-key"
GRPC_ADMIN_HEADER = "triton-grpc-protocol-admin-key"  # Triton prefixes the gRPC metadata key it checks
RESTRICTED_GRPC = "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'"  # tritonserver 2.51

# API (Triton's name) -> HTTP requests of it. docs/security.md gives the reason for each decision.
RESTRICTED_HTTP = [
    ("logging", "GET", "/v2/logging"),
    ("logging", "POST", "/v2/logging"),
    ("trace", "GET", "/v2/trace/setting"),
    ("trace", "POST", "/v2/models/reward_model/trace/setting"),
    ("model-repository", "POST", "/v2/repository/index"),
    ("model-repository", "POST", "/v2/repository/models/reward_engine/unload"),
    ("shared-memory", "GET", "/v2/systemsharedmemory/status"),
    ("shared-memory", "POST", "/v2/systemsharedmemory/region/r/register"),
    ("shared-memory", "POST", "/v2/cudasharedmemory/region/r/unregister"),
    ("statistics", "GET", "/v2/models/stats"),
    ("statistics", "GET", "/v2/models/reward_model/versions/1/stats"),
]
OPEN_HTTP = [
    ("health", "/v2/health/live"),
    ("health", "/v2/health/ready"),
    ("health", "/v2/models/reward_model/ready"),
    ("metadata", "/v2"),
    ("metadata", "/v2/models/reward_model"),
    ("model-config", "/v2/models/reward_model/config"),
]
# API -> a tritonclient.grpc call of it
RESTRICTED_GRPC_CALLS = {
    "logging": lambda c, **kw: c.update_log_settings({"log_verbose_level": 1}, **kw),
    "logging (read)": lambda c, **kw: c.get_log_settings(**kw),
    "trace": lambda c, **kw: c.update_trace_settings(settings={"trace_rate": "1"}, **kw),
    "model-repository": lambda c, **kw: c.get_model_repository_index(**kw),
    "model-repository (unload)": lambda c, **kw: c.unload_model("reward_engine", **kw),
    "shared-memory": lambda c, **kw: c.register_system_shared_memory("r", "/r", 64, **kw),
    "shared-memory (cuda)": lambda c, **kw: c.get_cuda_shared_memory_status(**kw),
    "statistics": lambda c, **kw: c.get_inference_statistics(**kw),
}
OPEN_GRPC_CALLS = {
    "health": lambda c: c.is_server_ready() and c.is_server_live() and c.is_model_ready("reward_model"),
    "metadata": lambda c: c.get_server_metadata() and c.get_model_metadata("reward_model"),
    "model-config": lambda c: c.get_model_config("reward_model"),
}


def post(url: str, headers: dict[str, str] | None = None, context=None) -> tuple[int, str]:
    return call(url, "POST", headers, context, b"{}")


def call(url: str, method: str, headers: dict[str, str] | None = None, context=None, data: bytes | None = None) -> tuple[int, str]:
    if method == "POST" and data is None:
        data = b'{"log_verbose_level": 1}'
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:  # a model load can take minutes on a busy machine
        with urllib.request.urlopen(request, timeout=300, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize(("api", "method", "path"), RESTRICTED_HTTP)
def test_restricted_http_apis_are_refused_without_a_key(server, api, method, path):
    status, body = call(server.http_url + path, method, {"admin-key": "a guess"})
    assert status == 403 and f"This API is restricted, expecting header 'admin-key' (the {api} API;" in body, (status, body)


@pytest.mark.parametrize(("api", "path"), OPEN_HTTP)
def test_open_http_apis_answer(server, api, path):
    assert call(server.http_url + path, "GET")[0] == 200, api


@pytest.mark.parametrize("api", sorted(RESTRICTED_GRPC_CALLS))
def test_restricted_grpc_apis_are_refused_without_a_key(server, api):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        RESTRICTED_GRPC_CALLS[api](client, headers={GRPC_ADMIN_HEADER: "a guess", "admin-key": "a guess"})
    client.close()
    assert caught.value.status() == "StatusCode.UNAVAILABLE" and caught.value.message() == RESTRICTED_GRPC


@pytest.mark.parametrize("api", sorted(OPEN_GRPC_CALLS))
def test_open_grpc_apis_answer(server, api):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert OPEN_GRPC_CALLS[api](client)
    client.close()


def test_the_logging_setting_is_unchanged(server):
    """After every refused attempt above (and here), Triton still logs at its start-up settings."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException):
        client.update_log_settings({"log_error": False})
    client.close()
    assert "Signal (11)" not in server.log.read_text()


def test_model_control_is_off_by_default(server):
    status, body = post(f"{server.http_url}/v2/repository/models/reward_engine/unload")
    assert status == 403 and "(the model-repository API; no admin key is configured)" in body, (status, body)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException):
        client.unload_model("reward_engine")
    assert client.is_model_ready("reward_engine") and client.is_model_ready("reward_model")
    client.close()


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory, checkpoint, certificates):
    """`make serve ADMIN_KEY=... TLS_CERT=... TLS_KEY=...`: explicit model control behind a key, TLS everywhere."""
    folder = tmp_path_factory.mktemp("locked")
    (folder / "admin.key").write_text(ADMIN_KEY + "\n")
    options = [
        "--admin-key-file",
        str(folder / "admin.key"),
        "--tls-cert",
        str(certificates / "server.pem"),
        "--tls-key",
        str(certificates / "server.key"),
    ]
    try:
        started = start_server(
            folder / "server.log", env={"REWARD_CHECKPOINT": str(checkpoint)}, options=options, ca_file=certificates / "ca.pem"
        )
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield started
    stop_server(started)


def test_tls_on_grpc_and_http(locked_server, certificates, reference_reward):
    expected = reference_reward(GOOD)
    for url in (locked_server.grpc_url, locked_server.http_url):
        assert url.startswith(("grpcs://", "https://"))
        with RewardClient(url, tls=locked_server.tls) as client:
            assert client.score(GOOD) == pytest.approx(expected, abs=1e-4)
    # Plain text to a TLS port, and TLS that does not trust the test CA: refused, never scored.
    for url, tls in ((f"localhost:{locked_server.grpc_port}", None), (f"http://localhost:{locked_server.http_port}", None)):
        with RewardClient(url, tls=tls, retry=Retry(attempts=1)) as client, pytest.raises(RewardClientError):
            client.score(GOOD)
    for url in (locked_server.grpc_url, locked_server.http_url):
        with RewardClient(url, retry=Retry(attempts=1)) as client, pytest.raises(ServerUnavailableError):
            client.score(GOOD)


def test_the_admin_key_opens_the_restricted_apis(locked_server):
    import ssl

    context = ssl.create_default_context(cafile=str(locked_server.ca_file))
    assert call(f"{locked_server.http_url}/v2/logging", "GET", context=context)[0] == 403
    status, body = call(f"{locked_server.http_url}/v2/logging", "GET", {"admin-key": ADMIN_KEY}, context)
    assert status == 200 and "log_verbose_level" in body
    assert call(f"{locked_server.http_url}/v2/models/stats", "GET", {"admin-key": ADMIN_KEY}, context)[0] == 200
    client = grpcclient.InferenceServerClient(
        locked_server.grpc_url.removeprefix("grpcs://"), ssl=True, root_certificates=str(locked_server.ca_file)
    )
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_log_settings(headers={"admin-key": ADMIN_KEY})  # the plain key name is not what Triton's gRPC checks
    assert "log_verbose_level" in str(client.get_log_settings(headers={GRPC_ADMIN_HEADER: ADMIN_KEY}))
    assert client.get_inference_statistics(headers={GRPC_ADMIN_HEADER: ADMIN_KEY})
    client.close()


@pytest.mark.parametrize("keyed", [False, True])
def test_no_key_on_any_command_line(server, locked_server, keyed):
    """`ps` shows no key: tritonserver's restricted flags carry a marker, which the preloaded
    argv_secrets library replaces in tritonserver's own memory (the admin key working over gRPC, above,
    shows it did). The key is in tritonserver's initial environment (readable by its user only), not in
    its stubs'."""
    from reward_server.launcher.front import ADMIN_HEADER, RESTRICTED

    running = locked_server if keyed else server
    processes = session_processes(running)
    (triton,) = [pid for pid, (command, _) in processes.items() if b"--grpc-restricted-protocol" in command]
    marker = b"%s:%s=\x01REWARD_SECRET_0\x01\x00" % (",".join(RESTRICTED).encode(), ADMIN_HEADER.encode())
    assert b"--http-restricted-api=" + marker in processes[triton][0]
    assert b"--grpc-restricted-protocol=" + marker in processes[triton][0]
    assert not any(ADMIN_KEY.encode() in command for command, _ in processes.values())
    assert {pid for pid, (_, environment) in processes.items() if ADMIN_KEY.encode() in environment} == ({triton} if keyed else set())
    assert {pid for pid, (_, environment) in processes.items() if b"argv_secrets" in environment} == {triton}


def test_unloading_needs_the_admin_key(locked_server):
    import ssl

    context = ssl.create_default_context(cafile=str(locked_server.ca_file))
    url = f"{locked_server.http_url}/v2/repository/models/nemo_reward_model"
    status, body = post(f"{url}/unload", context=context)
    assert status == 403 or "restricted" in body.lower(), (status, body)
    with RewardClient(locked_server.http_url, tls=locked_server.tls, model="nemo_reward_model") as client:
        assert client.is_ready()
    assert post(f"{url}/unload", {"admin-key": ADMIN_KEY}, context)[0] == 200
    time.sleep(2)  # the supervisor polls every 0.5 s: an unloaded model's stub is not a fault to restart for
    assert post(f"{url}/load", {"admin-key": ADMIN_KEY}, context)[0] == 200
    with RewardClient(locked_server.http_url, tls=locked_server.tls) as client:
        assert client.is_ready()
    assert "restarting tritonserver" not in locked_server.log.read_text()


@pytest.mark.parametrize("content", ["{{ 7 * 7 }}", "{% for x in range(3) %}{{ x }}{% endfor %}", "{{ raise_exception('boom') }}"])
def test_template_syntax_in_a_message_is_text(server, tokenizer, reference_reward, content):
    """Request text goes into the checkpoint's template as data (transformers' sandboxed renderer); it is never run."""
    conversation = [{"role": "user", "content": content}, {"role": "assistant", "content": content}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert rendered.count(content) == 2 and "49" not in rendered.replace(content, "")
    with RewardClient(server.grpc_url) as client:
        assert client.score(conversation) == pytest.approx(reference_reward(conversation), abs=1e-4)
    assert np.isfinite(reference_reward(conversation))
