"""Shared fixtures: the demo checkpoint, its transformers reference, and one live tritonserver."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.corpus import conversations
from tests.live_server import REPO

CHECKPOINT = Path(os.environ.get("REWARD_CHECKPOINT", REPO / ".build" / "demo-checkpoint"))
STEERLM_CHECKPOINT = REPO / ".build" / "steerlm-checkpoint"


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    if not (CHECKPOINT / "config.json").exists():
        pytest.fail(f"no checkpoint at {CHECKPOINT}: run `make setup` (it builds the demo checkpoint)")
    return CHECKPOINT


@pytest.fixture(scope="session")
def steerlm(checkpoint) -> Path:
    """The SteerLM demo checkpoint (NeMo-Aligner layout), built here if `make test` has not built it."""
    if not (STEERLM_CHECKPOINT / "reward_head.json").exists():
        command = [sys.executable, str(REPO / "build" / "demo_checkpoint.py"), "--layout", "steerlm"]
        subprocess.run([*command, "--tokenizer-from", str(checkpoint), "--out", str(STEERLM_CHECKPOINT)], check=True)
    return STEERLM_CHECKPOINT


@pytest.fixture(scope="session")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="session")
def token_ids(tokenizer):
    """The test corpus's conversations as the demo checkpoint's template renders them (token ids)."""
    return [np.array(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in conversations()]


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


@pytest.fixture(scope="session")
def server(tmp_path_factory, checkpoint):
    from tests.live_server import start_server, stop_server

    try:
        started = start_server(tmp_path_factory.mktemp("tritonserver") / "server.log", env={"REWARD_CHECKPOINT": str(checkpoint)})
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield started
    stop_server(started)


@pytest.fixture(params=["grpc", "http"])
def client(request, server):
    from reward_client import RewardClient

    url = server.grpc_url if request.param == "grpc" else server.http_url
    with RewardClient(url) as reward_client:
        yield reward_client


@pytest.fixture(scope="session")
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
