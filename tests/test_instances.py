"""Data parallelism's parts without a server: which instance Triton made, the count check, the launcher's
view of the repository with reward_engine's instance count set (the server test: test_tensor_parallel)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from reward_server.instances import EngineInstance, check_count, engine_instance
from reward_server.launcher.repository import engine_instances, serving_repository
from reward_server.parallel import rank_device
from reward_server.runtimes import load_engine
from reward_server.settings import Settings, read_parameters
from tests.live_server import REPO

REPOSITORY = REPO / "model_repository"


def _args(name: str, *groups: dict) -> dict[str, str]:
    return {"model_instance_name": name, "model_config": json.dumps({"name": "reward_engine", "instance_group": list(groups)})}


def test_the_instance_comes_from_tritons_name_and_config():
    """Triton 2.51 names a group's instances <group>_<k> (seen: reward_engine_0_0 and _0_1 in the server tests'
    metrics); an index beyond the count would be a name of another form, read as 0 for one instance."""
    assert engine_instance(_args("reward_engine_0_0", {"kind": "KIND_CPU", "count": 1})) == EngineInstance("reward_engine_0_0", 0, 1)
    assert engine_instance(_args("reward_engine_0", {"kind": "KIND_CPU", "count": 1})).index == 0
    two = {"kind": "KIND_CPU", "count": 2, "name": "reward_engine_0"}
    assert engine_instance(_args("reward_engine_0_1", two)) == EngineInstance("reward_engine_0_1", 1, 2)
    assert engine_instance(_args("reward_engine_0_0", two)).index == 0
    with pytest.raises(ValueError, match="2 instance groups"):
        engine_instance(_args("reward_engine_0", {"count": 1}, {"count": 1}))
    # count 1 without gpus: one instance on every GPU, each told it is the only one and on cuda:0 (was accepted)
    gpu = {"kind": "KIND_GPU"}
    for group in ({**gpu, "count": 2, "gpus": [0]}, {**gpu, "count": 1}, {**gpu, "count": 1, "gpus": [2]}):
        with pytest.raises(ValueError, match="use kind KIND_CPU, count N"):
            engine_instance(_args("reward_engine_0_0", group))


def test_a_count_set_in_one_place_only_fails_the_load():
    check_count(2, EngineInstance("reward_engine_0_1", 1, 2))
    with pytest.raises(ValueError, match=r"engine_instances is 2 but Triton runs 1 .*instance_group"):
        check_count(2, EngineInstance("reward_engine_0", 0, 1))


def test_instances_and_ranks_take_the_gpus_in_turn(monkeypatch):
    """On a CPU every instance and rank is on the CPU; a fixed cuda:N cannot be shared out. With GPUs
    (their count stubbed: this machine has none) ranks take them round robin, and instances sharing GPUs
    need memory_budget (refused before any GPU is touched)."""
    assert rank_device("cpu", 3) == "cpu"
    with pytest.raises(ValueError, match="use device cuda"):
        rank_device("cuda:1", 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [rank_device("cuda", i) for i in (0, 3, 4, 6)] == ["cuda:0", "cuda:3", "cuda:0", "cuda:2"]
    shared = Settings(checkpoint=str(REPO / ".build" / "demo-checkpoint"), device="cuda", engine_instances=3, tensor_parallel=2)
    with pytest.raises(ValueError, match=r"engine_instances 3 x tensor_parallel 2 ranks share 4 GPU\(s\): set memory_budget"):
        load_engine(shared)


def test_the_view_sets_reward_engines_count_and_keeps_everything_else(tmp_path):
    """Linked models, the engine's own files linked, its config the user's with the count set (KIND_CPU: the
    engine places itself on GPUs) and a relative checkpoint parameter made absolute against the user's
    folder (where it was meant)."""
    repository = tmp_path / "repository"
    shutil.copytree(REPOSITORY, repository, symlinks=True)
    engine_config = repository / "reward_engine" / "config.pbtxt"
    text = engine_config.read_text().replace("kind: KIND_CPU, count: 1", "kind: KIND_GPU, count: 1, gpus: [ 0 ]")
    engine_config.write_text(text + '\nparameters [ { key: "checkpoint", value: { string_value: "../../ckpt" } } ]\n')
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "view").mkdir()
    view = serving_repository(repository, 3, tmp_path / "view")
    assert sorted(p.name for p in view.iterdir()) == sorted(p.name for p in repository.iterdir())
    assert all((view / p.name).resolve() == p.resolve() for p in repository.iterdir() if p.name != "reward_engine")
    assert (view / "reward_engine" / "1").resolve() == (repository / "reward_engine" / "1").resolve()
    config = text_format.Parse((view / "reward_engine" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    original = text_format.Parse(engine_config.read_text(), model_config_pb2.ModelConfig())
    assert [(g.kind, g.count, list(g.gpus)) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 3, [])]
    assert config.parameters["checkpoint"].string_value == str((tmp_path / "ckpt").resolve())
    del config.instance_group[:], original.instance_group[:], config.parameters["checkpoint"], original.parameters["checkpoint"]
    assert config == original
    # The engine's settings through the view are the ones it would have without it.
    settings = Settings.for_model(view / "reward_engine", read_parameters(view / "reward_engine" / "config.pbtxt"), {})
    assert settings.checkpoint == str((tmp_path / "ckpt").resolve())


def test_the_launcher_reads_the_count_as_the_engine_will(tmp_path):
    """From $REWARD_ENGINE_INSTANCES (the flag sets it), else the configs; 1 when the settings do not resolve."""
    assert engine_instances(REPOSITORY, {}) == 1
    assert engine_instances(REPOSITORY, {"REWARD_ENGINE_INSTANCES": "4"}) == 4
    assert engine_instances(REPOSITORY, {"REWARD_ENGINE_INSTANCES": "zero"}) == 1


def test_two_instance_groups_are_refused(tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(REPOSITORY, repository, symlinks=True)
    engine_config = repository / "reward_engine" / "config.pbtxt"
    engine_config.write_text(engine_config.read_text().replace("count: 1 }", "count: 1 }, { kind: KIND_CPU, count: 1 }"))
    (tmp_path / "view").mkdir()
    with pytest.raises(ValueError, match="2 instance groups"):
        serving_repository(repository, 2, tmp_path / "view")
