"""Metrics on :8002: Triton's own nv_* and the project's reward_*, scraped by a real Prometheus."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from reward_client import InvalidConversationError, RewardClient
from reward_server import metrics
from tests.live_server import metric
from tests.prometheus_server import promtool_check, start_prometheus, stop_prometheus

GOOD = [{"role": "user", "content": "Count me."}, {"role": "assistant", "content": "Counted."}]
PROJECT = ("reward_",)


def exposition(server) -> str:
    return urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()


def success_count(server, model: str) -> float:
    count = metric(server.metrics(), "nv_inference_request_success_total", model=model)
    assert count is not None, f"nv_inference_request_success for {model} not exported"
    return count


def test_request_success_counts_requests(server):
    before = success_count(server, "reward_model")
    with RewardClient(server.grpc_url) as client:
        client.score_batch([GOOD] * 5)
    with RewardClient(server.http_url) as client:
        for _ in range(2):
            client.score(GOOD)
    # Triton counts a request when it releases it, which can come just after the client has its response.
    deadline = time.monotonic() + 10
    while success_count(server, "reward_model") - before < 7 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert success_count(server, "reward_model") - before == 7


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    try:
        started = start_prometheus(tmp_path_factory.mktemp("prometheus"), server.metrics_port)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield started
    stop_prometheus(started)


def test_prometheus_scrapes_the_project_metrics(server, prometheus):
    """After N known requests, Prometheus's HTTP API shows exactly what they should have added."""
    tokens, value_count, rejected = f"sum({metrics.TOKENS})", f'sum({metrics.VALUE}_count{{attribute="reward"}})', metrics.REJECTED
    prometheus.wait_for_scrape_after(time.time())
    before = {
        "tokens": prometheus.value(tokens),
        "values": prometheus.value(value_count),
        "reward_sum": prometheus.value(f'sum({metrics.VALUE}_sum{{attribute="reward"}})'),
        "too_long": prometheus.value(f'sum({rejected}{{reason="too_long"}})'),
        "order": prometheus.value(f'sum({rejected}{{reason="order"}})'),
        "reused": prometheus.value(f"sum({metrics.PREFIX_REUSED})"),
    }
    prompt = [{"role": "user", "content": "Tell me about the sea. " * 30}]
    with RewardClient(server.grpc_url) as client:
        scores = client.score_batch([GOOD, [*prompt, {"role": "assistant", "content": "Blue."}]])
        best_of = client.score_responses(prompt, ["Wet.", "Wide and deep.", "Salty."])
        with pytest.raises(InvalidConversationError, match="over the limit"):
            client.score([{"role": "user", "content": "x " * 5000}, GOOD[1]])
    # The client validates turn order itself; a raw request reaches the server's own check.
    _send_raw(server, b'[{"role": "assistant", "content": "a"}]')
    lengths = _lengths(server, [GOOD, [*prompt, {"role": "assistant", "content": "Blue."}]])
    lengths += _lengths(server, [[*prompt, {"role": "assistant", "content": r}] for r in ("Wet.", "Wide and deep.", "Salty.")])
    prometheus.wait_for_scrape_after(time.time() + 0.5)
    assert prometheus.value(tokens) - before["tokens"] == 2 * sum(lengths)  # _lengths scored them a second time
    assert prometheus.value(value_count) - before["values"] == 10
    expected_sum = 2 * sum(float(s) for s in [*scores, *best_of])
    assert prometheus.value(f'sum({metrics.VALUE}_sum{{attribute="reward"}})') - before["reward_sum"] == pytest.approx(
        expected_sum, abs=1e-3
    )
    assert prometheus.value(f'sum({rejected}{{reason="too_long"}})') - before["too_long"] == 1
    assert prometheus.value(f'sum({rejected}{{reason="order"}})') - before["order"] == 1
    assert prometheus.value(f"sum({metrics.PREFIX_REUSED})") - before["reused"] > 0  # best-of-3 shared its prompt
    # The engine's instance label as the server wrote it (one named "instance" became exported_instance).
    (series,) = prometheus.query(metrics.TOKENS)
    assert series["metric"]["engine_instance"] == "reward_engine_0_0" and "exported_instance" not in series["metric"]
    assert prometheus.value(f"sum({metrics.STEP_TOKENS}_count)") > 0 and prometheus.value(f"sum({metrics.STEP_SECONDS}_sum)") > 0
    # every step's wait for the device observed; on this CPU little of the steps' time (a wait measuring the step: all)
    assert prometheus.value(f"sum({metrics.STEP_DEVICE_WAIT}_count)") == prometheus.value(f"sum({metrics.STEP_SECONDS}_count)")
    assert prometheus.value(f"sum({metrics.STEP_DEVICE_WAIT}_sum)") < 0.5 * prometheus.value(f"sum({metrics.STEP_SECONDS}_sum)")


def test_promtool_accepts_the_project_metrics(server):
    """promtool lints the project's families clean (Triton's own nv_* counters lack the _total suffix)."""
    text = exposition(server)
    ours = "\n".join(line for line in text.splitlines() if re.sub(r"^# (HELP|TYPE) ", "", line).startswith(PROJECT)) + "\n"
    assert metrics.TOKENS in ours and f"{metrics.VALUE}_bucket" in ours
    result = promtool_check(ours)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(
        r'^nv_inference_queue_summary_us\{model="reward_engine",version="1",quantile="0.5"\} ', text, re.MULTILINE
    )  # summaries on


def _lengths(server, conversations) -> list[int]:
    """NUM_TOKENS of each conversation, as the server counted them (scoring them once more)."""
    import tritonclient.grpc as grpcclient

    from reward_client.conversation import to_json

    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("CONVERSATION", [len(conversations), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[to_json(c)] for c in conversations], dtype=np.object_))
    result = client.infer("reward_model", [tensor])
    client.close()
    return [int(n) for n in result.as_numpy("NUM_TOKENS").reshape(-1)]


def _send_raw(server, payload: bytes) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("CONVERSATION", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[payload]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="user and assistant alternating"):
        client.infer("reward_model", [tensor])
    client.close()


DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "reward-model.json"
# Triton exports these only where it sees GPUs (Triton's metrics documentation); none here.
GPU_ONLY = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes"}
PROMQL_WORDS = {
    "sum",
    "avg",
    "max",
    "min",
    "by",
    "without",
    "rate",
    "increase",
    "histogram_quantile",
    "le",
    "on",
    "and",
    "or",
}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return queries + [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def metric_names(query: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside label matchers and groupings."""
    query = re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", query)  # Grafana's label_values(metric, label)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(by|without)\s*\([^)]*\)|\"[^\"]*\"", " ", query)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", bare)) - PROMQL_WORDS
    return {n for n in names if not re.fullmatch(r"\d+", n)}


def test_every_dashboard_query_names_an_exported_metric_and_parses(server, prometheus):
    exported = {line.split("{")[0].split(" ")[0] for line in exposition(server).splitlines() if line and not line.startswith("#")}
    queries = dashboard_queries()
    assert len(queries) >= 15
    for query in queries:
        names = metric_names(query)
        assert names, query
        missing = names - exported - GPU_ONLY
        assert not missing, f"{query}: {sorted(missing)} not exported"
        if not query.startswith("label_values"):
            prometheus.query(query.replace("$attribute", "reward").replace("$__rate_interval", "1m"))  # Prometheus parses and runs it


def test_dashboard_heatmaps_read_buckets_as_buckets():
    """Prometheus's buckets are cumulative: a heatmap shows them only with the target's "heatmap" format (else every
    bucket above the observations is as hot as theirs)."""
    heatmaps = [panel for panel in json.loads(DASHBOARD.read_text())["panels"] if panel["type"] == "heatmap"]
    assert heatmaps
    for panel in heatmaps:
        for target in panel["targets"]:
            assert "_bucket" in target["expr"] and target.get("format") == "heatmap", panel["title"]


def test_dashboard_counts_errors_with_the_models_own_counters():
    """Triton 2.51 counts a python model's error answers as successes and an ensemble's failures twice: errors on
    the dashboard are the models' own rejected and failed counters, and nemo_reward_model's successes less them."""
    queries = dashboard_queries()
    assert not [q for q in queries if "nv_inference_request_failure" in q]
    for name in (metrics.REJECTED, metrics.FAILED):
        assert f'{name}{{model="nemo_reward_model"}}' in next(q for q in queries if 'request_success{model="nemo_reward_model"}' in q)
        assert any(q.startswith(f"sum by (model) (rate({name}[") for q in queries)


def test_dashboard_panels_show_each_series_in_its_unit():
    """Bytes in bytes and utilizations as ratios, on their own axis where a panel mixes them (utilization and
    memory shared one unitless axis: the utilization a flat line at 0); rates over Grafana's $__rate_interval
    (a fixed 1m window holds one sample at Prometheus's default scrape interval, 1m)."""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        config = panel.get("fieldConfig") or {"defaults": {}, "overrides": []}
        for target in panel["targets"]:
            unit = config["defaults"].get("unit")
            for override in config["overrides"]:
                if override["matcher"] == {"id": "byFrameRefID", "options": target["refId"]}:
                    unit = next((p["value"] for p in override["properties"] if p["id"] == "unit"), unit)
            if re.search(r"_bytes\b", target["expr"]):
                assert unit == "bytes", (panel["title"], target["expr"])
            if re.search(r"_utilization\b", target["expr"]):
                assert unit == "percentunit", (panel["title"], target["expr"])
            assert "[1m]" not in target["expr"], (panel["title"], target["expr"])
