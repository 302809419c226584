"""Deployment files: every Kubernetes manifest validates offline against the Kubernetes schemas, the
pieces refer to each other consistently, and the autoscaling metric is one the real server exports."""

from __future__ import annotations

import urllib.request

import kubernetes_validate
import pytest
import yaml

from conftest import REPO

MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.33.0"


def documents():
    return {(path.name, i): doc for path in MANIFESTS for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc}


def kind(name: str) -> dict:
    return next(doc for doc in documents().values() if doc["kind"] == name)


@pytest.mark.parametrize("key", sorted(documents()), ids=lambda key: f"{key[0]}#{key[1]}")
def test_manifest_validates_against_the_kubernetes_schema(key):
    kubernetes_validate.validate(documents()[key], KUBERNETES_VERSION, strict=True)


def test_manifests_fit_together():
    deployment, service, hpa, pdb = kind("Deployment"), kind("Service"), kind("HorizontalPodAutoscaler"), kind("PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == pod_labels == pdb["spec"]["selector"]["matchLabels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {"--model-control-mode=none", "--strict-readiness=true"} <= set(container["args"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert {p["containerPort"] for p in container["ports"]} == {8000, 8001, 8002}
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = next(doc for doc in documents().values() if "config.yaml" in doc.get("data", {}))  # prometheus-adapter's rules
    assert metric in {rule["name"]["as"] for rule in yaml.safe_load(adapter["data"]["config.yaml"])["rules"]}


def test_autoscaling_metric_is_exported_by_the_server(server):
    """The HPA's metric, with the label it selects on, is on the live server's :8002/metrics."""
    hpa = kind("HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]
    ((label, value),) = metric["selector"]["matchLabels"].items()
    exposition = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert any(line.startswith(metric["name"] + "{") and f'{label}="{value}"' in line for line in exposition.splitlines())


def test_dockerfile_builds_on_the_trtllm_image_and_serves_this_repository():
    """Static checks (no Docker engine here): base image, copied paths, entrypoint, runtime."""
    import re
    import shlex

    from reward_client.protocol import RUNTIMES

    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert re.fullmatch(r"ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-trtllm-python-py3", lines[0])
    workdir = next(line.split()[1] for line in lines if line.startswith("WORKDIR"))
    for line in lines:
        if line.startswith("COPY"):
            sources = shlex.split(line)[1:-1]
            assert all((REPO / source).exists() for source in sources), line
    entrypoint = next(line for line in lines if line.startswith("ENTRYPOINT"))
    assert f"{workdir}/build/supervisor.py" in entrypoint and entrypoint.rstrip("]").endswith('"tritonserver"')
    flags = next(line for line in lines if line.startswith("CMD"))
    assert f"--model-repository={workdir}/model_repository" in flags and "--model-control-mode=none" in flags
    runtime = re.search(r"REWARD_RUNTIME=(\S+)", text).group(1)
    assert runtime in RUNTIMES
