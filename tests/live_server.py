"""Start and stop a real tritonserver on free loopback ports (used by the tests and the benchmark)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from reward_client import TLS, RewardClient
from reward_server.launcher.serve import free_loopback_ports
from reward_server.launcher.supervisor import answers  # the supervisor's own health probe

REPO = Path(__file__).resolve().parent.parent

START_DEADLINE_S = 240


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> tuple[int, ...]:
    """`count` distinct free loopback ports, chosen as the launcher chooses Triton's."""
    return tuple(free_loopback_ports(count, exclude=set()))


@dataclass
class Server:
    http_port: int
    grpc_port: int
    metrics_port: int
    process: subprocess.Popen
    log: Path
    ca_file: Path | None = None  # set when the server speaks TLS (certificates signed by this CA)

    @property
    def grpc_url(self) -> str:
        return f"grpcs://localhost:{self.grpc_port}" if self.ca_file else f"localhost:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://localhost:{self.http_port}"

    @property
    def tls(self) -> TLS | None:
        return TLS(ca_file=str(self.ca_file)) if self.ca_file else None

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    def metrics(self) -> list[Sample]:
        """Every sample on the metrics port now, parsed by prometheus_client (which names the samples of
        Triton's nv_* counters, exported without a suffix, with `_total`, as it names every counter's)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def metric(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sum of `name`'s samples whose labels include `labels`; None when no such sample is exported."""
    values = [sample.value for sample in samples if sample.name == name and labels.items() <= sample.labels.items()]
    return sum(values) if values else None


class BackgroundLoop:
    """An asyncio event loop run by a daemon thread of its own: servers in the test process, beside
    blocking test code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def call(self, coroutine):
        """Run `coroutine` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def start_server(
    log: Path,
    *,
    model_repository: Path | None = None,
    env: dict[str, str] | None = None,
    ports: tuple[int, int, int] | None = None,
    options: list[str] | None = None,
    ca_file: Path | None = None,
) -> Server:
    """Start `reward-server` (on free ports, or the given HTTP, gRPC and metrics ports; `options` for
    the launcher, `ca_file` when they turn TLS on) in the repository, and wait until the reward model is
    ready; raise RuntimeError with the log's tail if not."""
    ports = ports or free_ports(3)
    command = [str(Path(sys.executable).with_name("reward-server")), "--address", "127.0.0.1"]
    command += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    if model_repository is not None:
        command += ["--model-repository", str(model_repository)]
    command += options or []
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO, start_new_session=True
        )
    server = Server(*ports, process=process, log=log, ca_file=ca_file)
    deadline = time.monotonic() + START_DEADLINE_S
    try:
        with RewardClient(server.grpc_url, tls=server.tls) as client:
            while not (client.is_ready() and answers(server.metrics_url)):  # the metrics service starts last
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tritonserver did not become ready; log:\n{log.read_text()[-4000:]}")
                time.sleep(0.5)
    except BaseException:  # not ready, or interrupted while waiting (Ctrl-C, a benchmark's SIGTERM): nothing left running
        stop_server(server)
        raise
    return server


def stop_server(server: Server) -> None:
    """SIGTERM the server's process group (tritonserver and its stubs), then SIGKILL what is left. A launcher
    that had to be killed never removed its shared-memory regions (the python backend's): removed here."""
    killed = False
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            killed = True
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.process.wait()
    if killed:
        for region in Path("/dev/shm").glob(f"reward_server_{server.process.pid}_*"):
            region.unlink(missing_ok=True)


def session_processes(server: Server) -> dict[int, tuple[bytes, bytes]]:
    """The command line and environment of every process of the server's session (the launcher,
    tritonserver, its stubs), by pid: what `ps` and /proc show about them."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            session = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[3])
            if session == server.process.pid:
                found[int(entry)] = (Path(f"/proc/{entry}/cmdline").read_bytes(), Path(f"/proc/{entry}/environ").read_bytes())
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found
