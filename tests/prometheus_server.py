"""A real Prometheus (Debian's package, unpacked by `make test` into .build/prometheus) scraping a
tritonserver's metrics port, on loopback with a generated config; started and stopped by the tests."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.live_server import REPO, free_port

BIN = REPO / ".build" / "prometheus" / "usr" / "bin"
SCRAPE_INTERVAL_S = 1


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen

    def query(self, promql: str) -> list[dict]:
        """Instant query results ([{"metric": {...}, "value": [t, "v"]}])."""
        address = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        body = json.loads(urllib.request.urlopen(address, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float:
        result = self.query(promql)
        return sum(float(r["value"][1]) for r in result)

    def last_scrape(self) -> float:
        """Unix time of the newest completed scrape of the server."""
        result = self.query('timestamp(up{job="tritonserver"})')
        return float(result[0]["value"][1]) if result else 0.0

    def wait_for_scrape_after(self, moment: float, deadline_s: float = 30) -> None:
        deadline = time.monotonic() + deadline_s
        while self.last_scrape() <= moment:
            assert time.monotonic() < deadline, "Prometheus did not scrape the server in time"
            time.sleep(0.2)


def start_prometheus(folder: Path, metrics_port: int) -> Prometheus:
    if not (BIN / "prometheus").exists():
        raise RuntimeError(f"no Prometheus at {BIN}: run `make setup-test` (or `make test`)")
    port = free_port()
    config = folder / "prometheus.yml"
    config.write_text(
        f"global: {{scrape_interval: {SCRAPE_INTERVAL_S}s, evaluation_interval: {SCRAPE_INTERVAL_S}s}}\n"
        f"scrape_configs:\n  - job_name: tritonserver\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    command = [str(BIN / "prometheus"), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}"]
    command += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with open(folder / "prometheus.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2).status == 200 and prometheus.last_scrape():
                return prometheus
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_prometheus(prometheus)
            raise RuntimeError(f"Prometheus did not start; log:\n{(folder / 'prometheus.log').read_text()[-3000:]}")
        time.sleep(0.2)


def stop_prometheus(prometheus: Prometheus) -> None:
    prometheus.process.terminate()
    try:
        prometheus.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        prometheus.process.kill()
        prometheus.process.wait()


def promtool_check(exposition: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "promtool"), "check", "metrics"], input=exposition, capture_output=True, text=True)
