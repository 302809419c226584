"""The model repository tritonserver is given: the user's, or, with `engine_instances` > 1, a view of it whose
reward_engine runs that many instances (Triton reads the count from config.pbtxt only, and the user's
repository may be read-only: an image, a Kubernetes volume).

The view is a folder of links to the user's models, but reward_engine's folder holds a copy of its
config.pbtxt with the count set (and its relative path parameters made absolute) beside links to the rest.
The models resolve their settings through the links to the user's folders, as without the view.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from google.protobuf import text_format  # with tritonclient's ModelConfig: Triton's own schema for config.pbtxt
from tritonclient.grpc import model_config_pb2

from reward_client.protocol import ENGINE_MODEL
from reward_server.settings import Settings, read_parameters, setting_kind

CONFIG = "config.pbtxt"


def engine_instances(repository: Path, env: dict[str, str]) -> int:
    """`engine_instances` as reward_engine will resolve it (1 when its settings do not resolve: the
    models then report the error at load)."""
    folder = repository.resolve() / ENGINE_MODEL
    try:
        return Settings.for_model(folder, read_parameters(folder / CONFIG), env).engine_instances
    except ValueError:
        return 1


def serving_repository(repository: Path, instances: int, view: Path) -> Path:
    """A view of `repository` made in the empty folder `view`, with reward_engine's instance count set to
    `instances` (reward-server serves the repository itself for one instance)."""
    source = repository.resolve()
    config = model_config_pb2.ModelConfig()
    text_format.Parse((source / ENGINE_MODEL / CONFIG).read_text(), config)
    if len(config.instance_group) > 1:
        raise ValueError(f"{source / ENGINE_MODEL / CONFIG}: {len(config.instance_group)} instance groups; engine_instances needs one")
    if not config.instance_group:
        config.instance_group.add()
    group = config.instance_group[0]
    group.kind, group.count = model_config_pb2.ModelInstanceGroup.KIND_CPU, instances  # the engine places itself on GPUs
    del group.gpus[:]
    for name, parameter in config.parameters.items():  # relative paths meant the user's folder
        if setting_kind(name) == "path" and parameter.string_value:
            parameter.string_value = str((source / ENGINE_MODEL / parameter.string_value).resolve())
    for entry in source.iterdir():
        (view / entry.name).symlink_to(entry)
    engine = view / ENGINE_MODEL
    engine.unlink()
    engine.mkdir()
    for entry in (source / ENGINE_MODEL).iterdir():
        if entry.name != CONFIG:
            (engine / entry.name).symlink_to(entry)
    (engine / CONFIG).write_text(text_format.MessageToString(config))
    return view


def set_parameters(config: Path | str, values: Mapping[str, str]) -> None:
    """Set `parameters` of a config.pbtxt. The images name their mounted checkpoint and their runtime so, in
    their own repository's ensemble, not as $REWARD_*: the environment would override the parameters of a
    repository given with --model-repository too (settings.py)."""
    path, parsed = Path(config), model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), parsed)
    for key, value in values.items():
        parsed.parameters[key].string_value = value
    path.write_text(text_format.MessageToString(parsed))
