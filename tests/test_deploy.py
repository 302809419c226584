"""Deployment files: every Kubernetes manifest validates offline against the Kubernetes schemas, the
pieces refer to each other consistently, the autoscaling metric is one the real server exports, and
both images (static checks: no Docker engine here) start the `reward-server` launcher with flags it
parses, on paths they copy."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import PurePosixPath

import kubernetes_validate
import pytest
import tomllib
import yaml

from reward_client.protocol import ENGINE_MODEL, ENSEMBLE_MODEL, NEMO_MODEL, PREPROCESSING_MODEL
from reward_server.launcher.serve import parser as launcher_parser
from reward_server.settings import ENV_PREFIX, RUNTIMES, read_parameters
from tests.live_server import REPO

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
    # The supervisor's restart of a failed server is a load as long as the first: liveness waits it out (it gave up at 600 s
    # of the startup probe's 900)
    probes = ("startupProbe", "livenessProbe")
    window = {probe: container[probe]["periodSeconds"] * container[probe]["failureThreshold"] for probe in probes}
    assert window["livenessProbe"] >= window["startupProbe"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert {p["containerPort"] for p in container["ports"]} == {8000, 8001, 8002}
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = next(doc for doc in documents().values() if "config.yaml" in doc.get("data", {}))  # prometheus-adapter's rules
    assert metric in {rule["name"]["as"] for rule in yaml.safe_load(adapter["data"]["config.yaml"])["rules"]}


def test_deployment_runs_the_launcher_with_its_admin_key_from_a_secret_file():
    """`args` are launcher flags (the image's entrypoint is `reward-server`): they parse, the probes and
    ports are the launcher's, and the admin key is a file of a mounted Secret, never an arg or env value."""
    pod = kind("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "command" not in container  # the image's entrypoint: the launcher
    args = launcher_parser().parse_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["http"], ports["grpc"], ports["metrics"]) == (args.http_port, args.grpc_port, args.metrics_port)
    assert all(container[probe]["httpGet"]["port"] == "http" for probe in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert args.setting_runtime in (None, "torch") and args.setting_checkpoint.startswith("/models/")
    key = PurePosixPath(args.admin_key_file)
    mount = next(m for m in container["volumeMounts"] if key.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] and {"key": "admin-key", "path": str(key.relative_to(mount["mountPath"]))} in volume["secret"]["items"]
    assert not any("ADMIN_KEY" in env["name"] for env in container.get("env", []))


def test_autoscaling_metric_is_exported_by_the_server(server):
    """The HPA's metric, with the label it selects on, is on the live server's :8002/metrics."""
    hpa = kind("HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]
    ((label, value),) = metric["selector"]["matchLabels"].items()
    assert any(sample.name == metric["name"] and sample.labels.get(label) == value for sample in server.metrics())


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, rest) per instruction, continuation lines joined, comments dropped."""
    lines = [line for line in (REPO / name).read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]


def extras() -> dict[str, list[str]]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


# (Dockerfile, its base image, the runtime it serves). 24.10 = Triton 2.51, the release the project's
# tests run (nvidia-pytriton 0.7.0) and whose python backend compat.check_numpy is about.
IMAGES = [
    ("Dockerfile", r"nvcr\.io/nvidia/tritonserver:24\.10-py3", "torch"),
    ("Dockerfile.trtllm", r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-trtllm-python-py3", "tensorrt_llm"),
]


@pytest.mark.parametrize(("name", "base", "runtime"), IMAGES, ids=[image[0] for image in IMAGES])
def test_image_starts_the_launcher_on_the_containers_tritonserver(name, base, runtime):
    instructions = dockerfile(name)
    assert instructions[0][0] == "ARG" and re.fullmatch(f"TRITON_IMAGE={base}", instructions[0][1])
    assert ("FROM", "${TRITON_IMAGE}") in instructions
    workdir = PurePosixPath(next(rest for op, rest in instructions if op == "WORKDIR"))
    copied = set()
    for op, rest in instructions:
        if op == "COPY":
            *sources, target = shlex.split(rest)
            assert all((REPO / source).exists() for source in sources), rest
            # a folder's contents land in the target; a file lands inside a target ending in /
            copied |= {workdir / target / (s if (REPO / s).is_file() else "") for s in sources}
    assert {workdir / "client", workdir / "server", workdir / "model_repository", workdir / "pyproject.toml"} <= copied
    entrypoint = json.loads(next(rest for op, rest in instructions if op == "ENTRYPOINT"))
    command = json.loads(next(rest for op, rest in instructions if op == "CMD"))
    assert entrypoint[:2] == ["/opt/nvidia/nvidia_entrypoint.sh", "reward-server"]  # the base image's CUDA setup, then the launcher
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["reward-server"]
    args = launcher_parser().parse_args(entrypoint[2:] + command)
    assert args.tritonserver == "/opt/tritonserver/bin/tritonserver" and args.backend_directory == "/opt/tritonserver/backends"
    assert PurePosixPath(args.model_repository) == workdir / "model_repository"
    env = dict(pair.split("=", 1) for op, rest in instructions if op == "ENV" for pair in shlex.split(rest))
    assert not [name for name in env if name.startswith(ENV_PREFIX)]  # they would override a mounted repository's parameters


@pytest.mark.parametrize(("name", "base", "runtime"), IMAGES, ids=[image[0] for image in IMAGES])
def test_image_names_its_checkpoint_and_runtime_in_its_own_repository(tmp_path, name, base, runtime):
    """The image's RUN, run on a copy of the repository: its ensemble names the mounted folder and the runtime,
    for every model (the image used to set $REWARD_CHECKPOINT and $REWARD_RUNTIME, which
    overrode the parameters of a repository given with --model-repository)."""
    import shutil
    import subprocess
    import sys

    (command,) = [shlex.split(rest) for op, rest in dockerfile(name) if op == "RUN" and "set_parameters" in rest]
    assert command[:2] == ["python3", "-c"] and len(command) == 3
    shutil.copytree(REPO / "model_repository", tmp_path / "model_repository", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-c", command[2]], cwd=tmp_path, check=True)
    mount = "/models/engine" if runtime == "tensorrt_llm" else "/models/checkpoint"
    assert read_parameters(tmp_path / "model_repository" / ENSEMBLE_MODEL / "config.pbtxt") == {"checkpoint": mount, "runtime": runtime}
    assert runtime in RUNTIMES
    for model in (PREPROCESSING_MODEL, ENGINE_MODEL, NEMO_MODEL):  # none names its own instead (settings.py: it would win)
        assert not {"checkpoint", "runtime"} & set(read_parameters(tmp_path / "model_repository" / model / "config.pbtxt"))


@pytest.mark.parametrize("name", [image[0] for image in IMAGES])
def test_image_builds_the_library_that_keeps_keys_off_command_lines(name):
    """The launcher builds argv_secrets.so under its working directory at the first start; the image
    builds it beforehand in the WORKDIR the ENTRYPOINT runs in, from the source the install put in
    site-packages (the package data)."""
    from reward_server.launcher.argv_secrets import LIBRARY_DIR, SOURCE

    run = [rest for op, rest in dockerfile(name) if op == "RUN"]
    assert "build_library()" in run[-1] and "gcc" in run[-1]
    assert LIBRARY_DIR == PurePosixPath(".build/triton") and SOURCE.exists()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["reward_server"]
    assert str(SOURCE.relative_to(REPO / "server" / "reward_server")) in package_data


def test_torch_image_installs_the_server_without_pytriton_and_with_numpy_below_2():
    """The torch image installs `server-core`: the `server` extra less nvidia-pytriton (the container's own
    tritonserver serves), with the numpy<2 pin the 2.51 python backend needs and the pinned torch."""
    run = " ".join(rest for op, rest in dockerfile("Dockerfile") if op == "RUN")
    assert '".[server-core]"' in run and "check_numpy()" in run
    core, server = extras()["server-core"], extras()["server"]
    assert sorted(server) == ["nvidia-pytriton==0.7.0", "reward-model-server[server-core]"]
    assert not any(req.startswith("nvidia-pytriton") for req in core)
    assert "numpy>=1.24,<2" in core and any(re.fullmatch(r"torch==[\d.]+", req) for req in core)
    assert any(req.startswith("transformers>=5") for req in core)


def test_trtllm_image_keeps_nvidias_pins():
    """TensorRT-LLM's container pins its own torch, transformers 4.x and numpy: the project goes in without
    its dependencies, so the launcher must import without torch or transformers (checked in a clean
    interpreter: importing it loads neither)."""
    import subprocess
    import sys

    run = " ".join(rest for op, rest in dockerfile("Dockerfile.trtllm") if op == "RUN")
    assert "--no-deps ." in run and "check_numpy()" in run
    probe = "import sys, reward_server.launcher.serve; print(sorted({'torch', 'transformers', 'tensorrt_llm'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
