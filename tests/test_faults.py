"""Faults: a python-backend stub killed under load. The supervisor restarts the server, clients
retry through it, and no request is ever answered with a wrong score."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from reward_client import Retry, RewardClient, Timeout

from corpus import conversations
from live_server import start_server, stop_server

STUB = b"triton_python_backend_stub"


def stubs_of(root: int) -> dict[int, bytes]:
    """Stub processes under `root` (the serve.py supervisor), with their command lines."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
            ancestry = int(entry)
            while ancestry > 1 and ancestry != root:
                ancestry = int(open(f"/proc/{ancestry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ancestry == root and STUB in cmdline:
            found[int(entry)] = cmdline
    return found


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory, checkpoint):
    holder = {"server": start_server(tmp_path_factory.mktemp("faults") / "server.log", env={"REWARD_CHECKPOINT": str(checkpoint)})}
    yield holder["server"]
    stop_server(holder["server"])


def test_engine_stub_killed_mid_load(fault_server, reference_reward):
    convs = conversations()[:8]
    expected = np.array([reference_reward(c) for c in convs])
    results, errors, stop = [], [], threading.Event()
    retry, timeout = Retry(attempts=40, backoff=0.5, max_backoff=2.0), Timeout(connect=2, request=60)

    def load() -> None:
        with RewardClient(fault_server.grpc_url, retry=retry, timeout=timeout, concurrency=4) as client:
            while not stop.is_set():
                try:
                    results.append(np.array(client.score_batch(convs)))
                except Exception as exc:
                    errors.append(exc)

    workers = [threading.Thread(target=load) for _ in range(2)]
    for worker in workers:
        worker.start()
    while len(results) < 3:
        time.sleep(0.1)
    engine = [pid for pid, cmdline in stubs_of(fault_server.process.pid).items() if b"reward_engine" in cmdline]
    assert len(engine) == 1, stubs_of(fault_server.process.pid)
    before = len(results)
    os.kill(engine[0], signal.SIGKILL)
    deadline = time.monotonic() + 180
    while len(results) < before + 6 and time.monotonic() < deadline:  # batches finished after the restart
        time.sleep(0.2)
    stop.set()
    for worker in workers:
        worker.join(timeout=120)
    assert not errors, errors[:3]
    assert len(results) >= before + 6, "the server did not come back"
    for scores in results:  # before, during and after the fault: every answer is the right score
        assert np.abs(scores - expected).max() <= 1e-4
    log = fault_server.log.read_text()
    assert "the python-backend stub of reward_engine died; restarting tritonserver" in log
    new_engine = [pid for pid, cmdline in stubs_of(fault_server.process.pid).items() if b"reward_engine" in cmdline]
    assert new_engine and new_engine != engine
