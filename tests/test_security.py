"""Locked-down defaults: no model control without a key, TLS on both protocols, templates that never
run request text."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from reward_client import Retry, RewardClient, RewardClientError, ServerUnavailableError

from live_server import start_server, stop_server

GOOD = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
ADMIN_KEY = "s3cret-admin-key"


def post(url: str, headers: dict[str, str] | None = None, context=None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=b"{}", headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_model_control_is_off_by_default(server):
    status, body = post(f"{server.http_url}/v2/repository/models/reward_engine/unload")
    assert status >= 400 and "load / unload is not allowed" in body, (status, body)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException):
        client.unload_model("reward_engine")
    assert client.is_model_ready("reward_engine") and client.is_model_ready("reward_model")
    client.close()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A CA, and a server certificate for localhost / 127.0.0.1 signed by it (openssl)."""
    folder = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    signing = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "san.ext"]
    openssl("x509", "-req", "-in", "server.csr", *signing, "-out", "server.pem")
    return folder


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory, checkpoint, certificates):
    """`make serve ADMIN_KEY=... TLS_CERT=... TLS_KEY=...`: explicit model control behind a key, TLS everywhere."""
    options = ["--admin-key", ADMIN_KEY, "--tls-cert", str(certificates / "server.pem"), "--tls-key", str(certificates / "server.key")]
    log = tmp_path_factory.mktemp("locked") / "server.log"
    try:
        started = start_server(log, env={"REWARD_CHECKPOINT": str(checkpoint)}, options=options, ca_file=certificates / "ca.pem")
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
