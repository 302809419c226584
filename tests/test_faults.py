"""Faults: a python-backend stub killed under load, and the whole server restarted. The supervisor
restarts the server, clients with default settings retry through it, and no request is ever answered
with a wrong score."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from reward_client import RewardClient
from tests.corpus import conversations
from tests.live_server import start_server, stop_server

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


def process_state(pid: int) -> str:
    """`pid`'s state letter (Z: a zombie not yet reaped), or "gone"."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory, checkpoint):
    """A server of this module's own, in a holder so that a test may replace it (restart it)."""
    log_dir = tmp_path_factory.mktemp("faults")
    holder = {"server": start_server(log_dir / "server.log", env={"REWARD_CHECKPOINT": str(checkpoint)}), "log_dir": log_dir}
    yield holder
    stop_server(holder["server"])


class Load:
    """Threads scoring the same conversations in a loop with a default-configured client, each
    batch's scores or error recorded."""

    def __init__(self, url: str, convs: list, workers: int = 2) -> None:
        self.url, self.convs = url, convs
        self.results: list[np.ndarray] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(workers)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        with RewardClient(self.url, concurrency=4) as client:  # default Retry and Timeout
            while not self.stop.is_set():
                try:
                    self.results.append(np.array(client.score_batch(self.convs)))
                except Exception as exc:
                    self.errors.append(exc)

    def wait_for(self, count: int, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while len(self.results) < count and not self.errors and time.monotonic() < deadline:
            time.sleep(0.1)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=180)
        assert not any(thread.is_alive() for thread in self.threads), "a client call hung"


def test_engine_stub_killed_mid_load(fault_server, reference_reward):
    server = fault_server["server"]
    convs = conversations()[:8]
    expected = np.array([reference_reward(c) for c in convs])
    load = Load(server.grpc_url, convs)
    try:
        load.wait_for(3, 300)
        assert len(load.results) >= 3 and not load.errors, load.errors[:3]
        engine = [pid for pid, cmdline in stubs_of(server.process.pid).items() if b"reward_engine" in cmdline]
        assert len(engine) == 1, stubs_of(server.process.pid)
        before = len(load.results)
        killed = time.monotonic()
        os.kill(engine[0], signal.SIGKILL)
        load.wait_for(before + 6, 400)  # batches finished after the restart
        print(f"stub killed; {len(load.results) - before} batches answered {time.monotonic() - killed:.1f} s later")
    finally:
        load.finish()
    assert not load.errors, load.errors[:3]
    assert len(load.results) >= before + 6, "the server did not come back"
    for scores in load.results:  # before, during and after the fault: every answer is the right score
        assert np.abs(scores - expected).max() <= 1e-4
    log = server.log.read_text()
    now = stubs_of(server.process.pid)
    # What the launcher and tritonserver said, and the stubs now, should the supervisor not have seen the death.
    seen = f"killed {engine[0]} ({process_state(engine[0])}); stubs now {now}; log:\n" + "\n".join(log.splitlines()[-60:])
    assert "the python-backend stub of reward_engine died; restarting tritonserver" in log, seen
    new_engine = [pid for pid, cmdline in now.items() if b"reward_engine" in cmdline]
    assert new_engine and new_engine != engine, seen


def test_default_client_rides_out_a_server_restart(fault_server, checkpoint, reference_reward):
    """The whole server stopped and started again on the same ports, while default clients are
    mid-call: every call returns the right score once the new server is up."""
    server = fault_server["server"]
    convs = conversations()[8:12]
    expected = np.array([reference_reward(c) for c in convs])
    load = Load(server.grpc_url, convs)
    try:
        load.wait_for(2, 300)
        assert len(load.results) >= 2 and not load.errors, load.errors[:3]
        stopped = time.monotonic()
        stop_server(server)
        before = len(load.results)  # from here on, only the new server can answer
        ports = (server.http_port, server.grpc_port, server.metrics_port)
        log = fault_server["log_dir"] / "restarted.log"
        fault_server["server"] = start_server(log, env={"REWARD_CHECKPOINT": str(checkpoint)}, ports=ports)
        load.wait_for(before + 4, 400)  # each worker may append one answer of the old server late
        print(f"server stopped; answered again {time.monotonic() - stopped:.1f} s later")
    finally:
        load.finish()
    assert not load.errors, load.errors[:3]
    assert len(load.results) >= before + 4, "no answer from the restarted server"
    for scores in load.results:
        assert np.abs(scores - expected).max() <= 1e-4


def _python310() -> str | None:
    """A Python 3.10 (the NGC image's, which the launcher also runs on), or None: pyenv's where its shim is off."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for found in [shutil.which("python3.10"), *map(str, sorted(root.glob("versions/3.10*/bin/python3.10")))]:
        if found and subprocess.run([found, "-c", ""], capture_output=True).returncode == 0:
            return found
    return None


# supervisor.py uses the standard library only: loaded from its file, it runs under any Python
SUPERVISED = """
import asyncio, importlib.util, os, signal, sys, time
spec = importlib.util.spec_from_file_location("supervisor", sys.argv[1])
supervisor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(supervisor)
def log(line):
    print(f"{time.monotonic():.3f} {line}", flush=True)
    if "restart 3" in line:  # in the pause before the third restart (without pauses: at once, ending the loop anyway)
        os.kill(os.getpid(), signal.SIGTERM)
sys.exit(asyncio.run(supervisor.supervise([sys.executable, sys.argv[2]], dict(os.environ), sys.argv[3], log)))
"""


@pytest.mark.parametrize("python", ["this", "3.10"])
def test_a_server_that_keeps_exiting_soon_after_ready_is_restarted_after_growing_pauses(tmp_path, python):
    """The supervisor over a stand-in for a tritonserver in a crash loop (it answers ready, then exits 139
    half a second after its first answer: a poison request resent by its clients): the first restart at once, then after
    1 s, then 2 s (they used to follow each other at once, forever); SIGTERM during a pause ends it. Also
    under Python 3.10, whose asyncio.wait_for raises another TimeoutError than the builtin (it ended the
    launcher there at the second pause)."""
    import subprocess
    import sys

    from reward_server.launcher import supervisor
    from reward_server.launcher.supervisor import restart_delay
    from tests.live_server import free_port

    interpreter = sys.executable if python == "this" else _python310()
    if interpreter is None:
        pytest.skip("no Python 3.10 here")
    assert [restart_delay(n) for n in range(1, 10)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]
    port = free_port()
    crashing, driver = tmp_path / "crashing_server.py", tmp_path / "supervised.py"
    crashing.write_text(
        "import http.server, os, threading\n"
        "class Ready(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.send_header('Content-Length', '0'); self.end_headers()\n"
        "        threading.Timer(0.5, os._exit, (139,)).start()  # after being seen ready, however late the probe\n"
        "    def log_message(self, *args): pass\n"
        "class Server(http.server.ThreadingHTTPServer):\n"
        "    allow_reuse_address = True\n"
        f"Server(('127.0.0.1', {port}), Ready).serve_forever()\n"
    )
    driver.write_text(SUPERVISED)
    command = [interpreter, str(driver), supervisor.__file__, str(crashing), f"http://127.0.0.1:{port}"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 139, run.stderr[-2000:]
    lines = [(float(t), line) for t, line in (entry.split(" ", 1) for entry in run.stdout.splitlines())]
    exits = [(t, line) for t, line in lines if "exited with 139" in line]
    assert [line.split("; ", 1)[1] for _, line in exits] == [
        "restart 1",
        "restart 2 in 1 s (2 exits in a row within 60 s of being ready)",
        "restart 3 in 2 s (3 exits in a row within 60 s of being ready)",
    ]
    readies = [t for t, line in lines if "is ready" in line]
    assert len(readies) == 3 and readies[2] - exits[1][0] >= 1.0  # the pause was waited out before the next start
