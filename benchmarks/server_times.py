"""Where a server's time went in a timed run: its engine's packed steps (the project's metrics) and each model of
the ensemble's executions and queueing (Triton's statistics API, behind the admin key that the benchmarks start
their servers with: `ENV`).

    before = snapshot(server); ...timed run...; spent = since(server, before)

What `spent` tells: `<model>_busy`, the share of the run the model was executing (the engine's below 1 while
requests wait: the time between its steps); `<model>_queue_ms_per_request`, how long its requests waited for
it; `engine_steps_busy`, the share spent in the steps themselves (the rest of the engine's executions is reading
requests, planning and answering). Requests sent one at a time: `outside_models_ms_per_request`, what neither
model spent of the client's time (client, gRPC/HTTP, the front, the ensemble's hand-overs).
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.request

from reward_server.launcher.front import ADMIN_HEADER
from reward_server.launcher.serve import ADMIN_KEY_ENV
from reward_server.metrics import STEP_DEVICE_WAIT, STEP_SECONDS, STEP_TOKENS
from tests.live_server import Server

ADMIN_KEY = secrets.token_urlsafe(16)
ENV = {ADMIN_KEY_ENV: ADMIN_KEY}  # with the other REWARD_* settings of a benchmark's server
MODELS = ("preprocessing", "reward_engine")
STEPS = {f"{STEP_TOKENS}_count": "steps", f"{STEP_TOKENS}_sum": "step_tokens", f"{STEP_SECONDS}_sum": "step_seconds"}
STEPS[f"{STEP_DEVICE_WAIT}_sum"] = "step_device_wait"


def snapshot(server: Server) -> dict[str, float]:
    """The server's counters now, and when their reading started and ended."""
    from prometheus_client.parser import text_string_to_metric_families

    started = time.perf_counter()
    counters = dict.fromkeys([*STEPS.values(), *(f"{m}_{k}" for m in MODELS for k in ("executions", "seconds", "requests", "queued"))], 0.0)
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        for family in text_string_to_metric_families(response.read().decode()):
            for sample in family.samples:
                if sample.name in STEPS:
                    counters[STEPS[sample.name]] += sample.value
    for model in MODELS:
        request = urllib.request.Request(f"{server.http_url}/v2/models/{model}/stats", headers={ADMIN_HEADER: ADMIN_KEY})
        with urllib.request.urlopen(request, timeout=10) as response:
            for version in json.load(response)["model_stats"]:
                # batch_stats: one entry per execution (a batch of requests); inference_stats: per request
                executed = [b[k] for b in version["batch_stats"] for k in ("compute_input", "compute_infer", "compute_output")]
                counters[f"{model}_executions"] += version["execution_count"]
                counters[f"{model}_seconds"] += sum(int(e["ns"]) for e in executed) / 1e9
                counters[f"{model}_requests"] += version["inference_stats"]["success"]["count"]
                counters[f"{model}_queued"] += int(version["inference_stats"]["queue"]["ns"]) / 1e9
    return {**counters, "started": started, "ended": time.perf_counter()}


def since(server: Server, before: dict[str, float], one_at_a_time: bool = False, scoring_thread: bool = False) -> dict[str, float]:
    """What the server spent since `before` (a snapshot): its steps, how busy each model was, and per request;
    `one_at_a_time` (the requests were): also what neither model spent of each. With `scoring_thread` (the
    server's setting) the engine's execute only hands its requests over: Triton's figures of reward_engine
    (busy, per execution, queueing) are not its work, and are left out; engine_steps_busy is."""
    now = snapshot(server)
    spent = {name: now[name] - before[name] for name in now}
    wall, steps = now["started"] - before["ended"], max(spent["steps"], 1)
    found = {
        "steps": spent["steps"],
        "tokens_per_step": spent["step_tokens"] / steps,
        "ms_per_step": 1e3 * spent["step_seconds"] / steps,
        "device_wait_ms_per_step": 1e3 * spent["step_device_wait"] / steps,
        "engine_steps_busy": spent["step_seconds"] / wall,
    }
    for model in MODELS if not scoring_thread else [m for m in MODELS if m != "reward_engine"]:
        executions, requests = max(spent[f"{model}_executions"], 1), max(spent[f"{model}_requests"], 1)
        found[f"{model}_requests_per_execution"] = spent[f"{model}_requests"] / executions
        found[f"{model}_ms_per_execution"] = 1e3 * spent[f"{model}_seconds"] / executions
        found[f"{model}_busy"] = spent[f"{model}_seconds"] / wall
        found[f"{model}_queue_ms_per_request"] = 1e3 * spent[f"{model}_queued"] / requests
    if one_at_a_time and not scoring_thread:
        outside = wall - spent["preprocessing_seconds"] - spent["reward_engine_seconds"]
        found["outside_models_ms_per_request"] = 1e3 * outside / max(spent["reward_engine_requests"], 1)
    return found


def describe(spent: dict[str, float]) -> str:
    """`since`'s figures on one line."""
    return ", ".join(f"{name} {value:.3g}" for name, value in spent.items())
