"""Shared fixtures: the demo checkpoint, its transformers reference, and one live tritonserver."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reward_client import RewardClient

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = Path(os.environ.get("REWARD_CHECKPOINT", REPO / ".build" / "demo-checkpoint"))
ENGINE_DIR = REPO / "model_repository" / "reward_engine" / "1"
SERVER_START_DEADLINE_S = 240

# The engine's helper modules live beside its model.py, where Triton puts them on sys.path.
sys.path.insert(0, str(ENGINE_DIR))


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    if not (CHECKPOINT / "config.json").exists():
        pytest.fail(f"no checkpoint at {CHECKPOINT}: run `make setup`")
    return CHECKPOINT


@pytest.fixture(scope="session")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="session")
def reference_model(checkpoint):
    """The model card's way: the whole causal LM in fp32, eager attention, no project code."""
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def reference_reward(reference_model, tokenizer):
    """reward = logit of token id 0 at the last position of apply_chat_template(messages)."""

    @torch.inference_mode()
    def reward(messages) -> float:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, return_dict=False)
        return reference_model(torch.tensor([ids])).logits[0, -1, 0].item()

    return reward


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    http_port: int
    grpc_port: int
    metrics_port: int
    process: subprocess.Popen
    log: Path

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://localhost:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    def urls(self) -> list[str]:
        return [self.grpc_url, self.http_url]


def start_server(log: Path, extra_env: dict[str, str] | None = None) -> Server:
    ports = [free_port() for _ in range(3)]
    command = [sys.executable, str(REPO / "build" / "serve.py"), "--address", "127.0.0.1"]
    command += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    env = {**os.environ, "REWARD_CHECKPOINT": str(CHECKPOINT), **(extra_env or {})}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(*ports, process=process, log=log)
    deadline = time.monotonic() + SERVER_START_DEADLINE_S
    with RewardClient(server.grpc_url) as client:
        while not client.is_ready():
            if process.poll() is not None or time.monotonic() > deadline:
                stop_server(server)
                pytest.fail(f"tritonserver did not become ready; log:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
    return server


def stop_server(server: Server) -> None:
    """SIGTERM the server's process group (tritonserver and its stubs), then SIGKILL what is left."""
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory, checkpoint):
    started = start_server(tmp_path_factory.mktemp("tritonserver") / "server.log")
    yield started
    stop_server(started)


@pytest.fixture(params=["grpc", "http"])
def client(request, server):
    url = server.grpc_url if request.param == "grpc" else server.http_url
    with RewardClient(url) as reward_client:
        yield reward_client
