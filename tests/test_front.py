"""The HTTP front (reward_server/launcher/front.py): bodies that crash Triton 2.51's own HTTP server
never reach it, bodies over the cap get 413, KServe v2 passes through unchanged, and a restart leaves
no shared memory behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import tritonclient.http as httpclient

from reward_client import RewardClient, protocol
from reward_server.launcher import front
from reward_server.launcher.backend import tritonserver_binary
from reward_server.launcher.supervisor import answers
from tests.live_server import free_port, start_server, stop_server

GOOD = [{"role": "user", "content": "Is the front transparent?"}, {"role": "assistant", "content": "It should be."}]
CRASH_SIZE = 4_500_000  # over the ~4.19 MB at which Triton 2.51's HTTP server dies, under the 16 MiB cap
FORM = "application/x-www-form-urlencoded"


def request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None, method: str | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {}, method=method), timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def kserve_body(conversation_json: str) -> bytes:
    tensor = {"name": protocol.CONVERSATION, "shape": [1, 1], "datatype": "BYTES", "data": [conversation_json]}
    return json.dumps({"inputs": [tensor]}).encode()


def tritonserver_pid(server) -> int:
    """The launcher's tritonserver child."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")[0]
        except (OSError, IndexError):
            continue
        if int(fields[1]) == server.process.pid and command.endswith(b"tritonserver") and fields[0] not in "ZX":
            return int(stat.parent.name)
    raise AssertionError("no tritonserver under the launcher")


@pytest.mark.parametrize(
    ("path", "content_type"), [("/v2/health/ready", FORM), ("/v2/health/ready", FORM.upper() + "; charset=utf-8"), ("/v2", FORM)]
)
def test_api_paths_are_classified(path, content_type):
    assert front.api_of(path) in ("health", "metadata")
    assert front.forwarded_content_type(content_type) == "application/json"
    assert front.forwarded_content_type("application/octet-stream") == "application/octet-stream"


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v2/models/stats", "statistics"),
        ("/v2/models/reward_model/versions/1/stats", "statistics"),
        ("/v2/models/reward_model/versions/1/infer", "inference"),
        ("/v2/models/reward_model/config", "model-config"),
        ("/v2/models/reward_model/trace/setting", "trace"),
        ("/v2/repository/models/x/load", "model-repository"),
        ("/v2/cudasharedmemory/region/x/register", "shared-memory"),
        ("/v2/models/../logging", None),
        ("/v2/models/./infer", None),
        ("/v2//logging", None),
        ("/metrics", None),
    ],
)
def test_every_path_maps_to_one_api_or_none(path, api):
    assert front.api_of(path) == api


def test_the_bug_the_front_exists_for(tmp_path):
    """Triton 2.51's HTTP server dies (SIGSEGV) on a large form-urlencoded body: what clients must never reach."""
    port = free_port()
    repository = tmp_path / "empty"
    repository.mkdir()
    command = [str(tritonserver_binary()), f"--model-repository={repository}", "--http-address=127.0.0.1", f"--http-port={port}"]
    command += ["--allow-grpc=false", "--allow-metrics=false"]
    with open(tmp_path / "log", "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not answers(f"http://127.0.0.1:{port}/v2/health/ready"):
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.2)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            request(f"http://127.0.0.1:{port}/v2/health/ready", b"a" * CRASH_SIZE, {"Content-Type": FORM})
        assert server.wait(timeout=30) == -signal.SIGSEGV
    finally:
        server.kill()
        server.wait()


def test_form_bodies_reach_no_triton_http_server(server, reference_reward):
    """A body between the crash size and the cap, sent form-urlencoded to the inference, health and metrics
    ports: each answered, the same tritonserver process serving after, no restart."""
    pid = tritonserver_pid(server)
    big = json.dumps([{"role": "user", "content": "x" * CRASH_SIZE}, {"role": "assistant", "content": "y"}])
    status, body = request(f"{server.http_url}/v2/models/reward_model/infer", kserve_body(big), {"Content-Type": FORM})
    assert status == 400 and b"bytes is over the limit of 1048576 bytes" in body, (status, body[:300])  # parsed as JSON
    status, _ = request(f"{server.http_url}/v2/health/ready", b"a" * CRASH_SIZE, {"Content-Type": FORM})
    assert status in (200, 405)
    status, _ = request(server.metrics_url, b"a" * CRASH_SIZE, {"Content-Type": FORM})
    assert status == 405  # the metrics port serves GET only
    # What `curl -d` sends for the README's KServe JSON: scored.
    status, body = request(f"{server.http_url}/v2/models/reward_model/infer", kserve_body(json.dumps(GOOD)), {"Content-Type": FORM})
    assert status == 200, body
    reward = next(o for o in json.loads(body)["outputs"] if o["name"] == protocol.REWARD)["data"][0]
    assert reward == pytest.approx(reference_reward(GOOD), abs=1e-4)
    assert tritonserver_pid(server) == pid
    with RewardClient(server.http_url) as client:
        assert client.is_ready()
    assert "restart" not in server.log.read_text()


def test_a_declared_body_over_the_cap_is_413_before_it_is_sent(server):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        head = f"POST /v2/models/reward_model/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {front.MAX_BODY_BYTES + 1}\r\n\r\n"
        sock.sendall(head.encode())
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert f"request body of {front.MAX_BODY_BYTES + 1} bytes is over the limit of {front.MAX_BODY_BYTES} bytes" in answer
    metrics = request(server.metrics_url)[1].decode()
    assert "reward_http_bodies_too_large_total" in metrics and 'api="inference",code="413"' in metrics


def test_an_undeclared_body_over_the_cap_is_413(server):
    """A chunked body (no Content-Length) is counted as it arrives; a front with a 1 KiB cap in front of the live server."""

    async def main() -> tuple[int, str, int, str]:
        app = front.application(server.http_url, admin_key=None, max_body_bytes=1024)
        runner = await front.start(app, "127.0.0.1", port := free_port())
        try:
            async with aiohttp.ClientSession() as session:

                async def chunks(n: int):
                    for _ in range(n):
                        yield b"a" * 256

                url = f"http://127.0.0.1:{port}/v2/models/reward_model/infer"
                async with session.post(url, data=chunks(5)) as over:
                    over_answer = over.status, await over.text()
                async with session.post(url, data=kserve_body(json.dumps(GOOD))) as fits:
                    return (*over_answer, fits.status, await fits.text())
        finally:
            await runner.cleanup()

    status, text, good_status, good_text = asyncio.run(main())
    assert status == 413 and "over the limit of 1024 bytes" in text, text
    assert good_status == 200 and protocol.REWARD in good_text


def test_binary_tensors_pass_through(server, reference_reward):
    """KServe's binary-tensor extension (Inference-Header-Content-Length, octet-stream), both ways."""
    client = httpclient.InferenceServerClient(f"localhost:{server.http_port}")
    tensor = httpclient.InferInput(protocol.CONVERSATION, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[json.dumps(GOOD).encode()]], dtype=np.object_), binary_data=True)
    result = client.infer(protocol.ENSEMBLE_MODEL, [tensor], outputs=[httpclient.InferRequestedOutput(protocol.REWARD, binary_data=True)])
    client.close()
    assert float(result.as_numpy(protocol.REWARD)[0, 0]) == pytest.approx(reference_reward(GOOD), abs=1e-4)


def test_query_strings_and_unknown_paths(server):
    assert request(f"{server.http_url}/v2/health/ready?probe=1")[0] == 200
    status, body = request(f"{server.http_url}/v2/nothing-here")
    assert status == 404 and b"no such endpoint" in body


def test_the_metrics_port_serves_triton_and_front_metrics(server):
    request(f"{server.http_url}/v2/health/live")
    status, body = request(server.metrics_url)
    text = body.decode()
    assert status == 200 and "nv_inference_count" in text
    assert 'reward_http_requests_total{api="health",code="200"}' in text


def test_a_killed_server_leaves_no_shared_memory(tmp_path, checkpoint):
    """The supervisor removes the python-backend regions of a server that died before it restarts it."""
    server = start_server(tmp_path / "server.log", env={"REWARD_CHECKPOINT": str(checkpoint)})
    try:
        mine = f"reward_server_{server.process.pid}_"
        before = sorted(p.name for p in Path("/dev/shm").glob(f"{mine}*"))
        assert before, "the python backend made no regions with this server's prefix"
        pid, deadline = tritonserver_pid(server), time.monotonic() + 240
        while f"tritonserver (pid {pid}) is ready" not in server.log.read_text():  # the supervisor restarts only a server it saw ready
            assert time.monotonic() < deadline, server.log.read_text()[-3000:]
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        with RewardClient(server.grpc_url) as client:
            while "restart 1" not in server.log.read_text() or not client.is_ready():
                assert time.monotonic() < deadline, server.log.read_text()[-3000:]
                time.sleep(0.5)
            assert client.score(GOOD)
        after = sorted(p.name for p in Path("/dev/shm").glob(f"{mine}*"))
        assert len(after) == len(before) and not set(after) & set(before), (before, after)
        assert "shared-memory region(s)" in server.log.read_text()
    finally:
        stop_server(server)
    assert not list(Path("/dev/shm").glob(f"{mine}*"))


def test_the_shipped_binary_has_no_body_limit_flag():
    """docs/security.md: the body cap is the front's; tritonserver 2.51 has no --http-max-input-size."""
    help_text = subprocess.run([str(tritonserver_binary()), "--help"], capture_output=True, text=True, timeout=60)
    text = help_text.stdout + help_text.stderr
    assert "--http-restricted-api" in text and "--http-max-input-size" not in text


def test_content_encodings_are_the_clients_own(server, reference_reward):
    """A client that asks for no encoding gets none (aiohttp's session asked Triton for gzip on its behalf);
    a gzip request body is decoded once (it reached Triton decoded and still labelled gzip); one that does not
    decode is a 400 naming it, not a 500."""
    import gzip
    import http.client

    url = "/v2/models/reward_model/infer"
    connection = http.client.HTTPConnection("localhost", server.http_port, timeout=60)
    for body, headers in (
        (kserve_body(json.dumps(GOOD)), {}),
        (gzip.compress(kserve_body(json.dumps(GOOD))), {"Content-Encoding": "gzip"}),
    ):
        connection.putrequest("POST", url, skip_accept_encoding=True)  # no Accept-Encoding at all, as curl sends
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        answer = connection.getresponse()
        payload = answer.read()
        assert answer.status == 200 and answer.getheader("Content-Encoding") is None, (answer.status, payload[:200])
        reward = next(o for o in json.loads(payload)["outputs"] if o["name"] == protocol.REWARD)["data"][0]
        assert reward == pytest.approx(reference_reward(GOOD), abs=1e-4)
    status, payload = request(
        f"{server.http_url}{url}", b"\x1f\x8b not gzip", {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    assert status == 400 and b"content-encoding" in payload.lower(), (status, payload[:200])


def test_forwarded_requests_keep_only_end_to_end_headers():
    """What Triton is sent: not the headers a Connection header names (RFC 9110 7.6.1), not Content-Encoding
    (the front has decoded the body), not Authorization (the front's API key never reaches tritonserver)."""
    from aiohttp.test_utils import make_mocked_request

    headers = {
        "Connection": "close, X-Internal",
        "X-Internal": "secret",
        "Authorization": "Bearer key",
        "Content-Encoding": "gzip",
        "Content-Type": FORM,
        "Inference-Header-Content-Length": "12",
    }
    forwarded = front._forwarded_headers(make_mocked_request("POST", "/v2/models/m/infer", headers=headers))
    assert dict(forwarded) == {"Content-Type": "application/json", "Inference-Header-Content-Length": "12"}


def test_a_client_ca_without_a_server_certificate_is_refused():
    """It used to be ignored: HTTP and gRPC served in plain text, no client certificate asked for."""
    from reward_server.launcher.serve import main

    with pytest.raises(SystemExit) as exit_:
        main(["--tls-client-ca", "ca.pem"])
    assert exit_.value.code == 2
