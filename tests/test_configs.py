"""The model repository's configs parse as Triton ModelConfig and use the shared tensor names."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from reward_client import protocol
from reward_server.settings import Settings, parse_bool, parse_int, read_parameters

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


def load(model: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((REPOSITORY / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def names(tensors) -> set[str]:
    return {t.name for t in tensors}


def test_tensor_names_match_protocol():
    pre, engine, ensemble = load(protocol.PREPROCESSING_MODEL), load(protocol.ENGINE_MODEL), load(protocol.ENSEMBLE_MODEL)
    scores = {protocol.REWARD, protocol.ATTRIBUTES, protocol.ATTRIBUTE_NAMES, protocol.TURN_REWARDS, protocol.TURN_ATTRIBUTES}
    optional = {protocol.SCORE_TURNS, protocol.TEXT, protocol.TOKENS, protocol.ADD_SPECIAL_TOKENS, protocol.KEEP_LAST_TOKENS}
    assert names(pre.input) == names(ensemble.input) == {protocol.CONVERSATION} | optional
    assert names(pre.output) == {protocol.INPUT_IDS, protocol.NUM_TOKENS, protocol.SCORE_AT}
    assert names(engine.input) == {protocol.INPUT_IDS, protocol.NUM_TOKENS, protocol.SCORE_AT}
    assert names(engine.output) == scores
    assert names(ensemble.output) == scores | {protocol.NUM_TOKENS}
    assert all(t.optional for t in ensemble.input)  # exactly one of CONVERSATION, TEXT, TOKENS: checked by preprocessing
    assert names(pre.input) == {key for step in ensemble.ensemble_scheduling.step for key in step.input_map} - names(engine.input)
    assert [step.model_name for step in ensemble.ensemble_scheduling.step] == [protocol.PREPROCESSING_MODEL, protocol.ENGINE_MODEL]


def test_engine_batches_ragged_requests():
    engine = load(protocol.ENGINE_MODEL)
    assert engine.max_batch_size > 1 and engine.HasField("dynamic_batching")
    ids = next(t for t in engine.input if t.name == protocol.INPUT_IDS)
    assert ids.allow_ragged_batch and list(ids.dims) == [-1]


def test_parameters_are_read_once_with_one_meaning():
    assert parse_bool("TRUE", "a") is True
    assert parse_bool("off", "x") is False
    assert parse_int("12", "n") == 12
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("maybe", "x")
    with pytest.raises(ValueError, match="below the minimum"):
        parse_int("0", "n")


def test_settings_come_from_the_environment_then_the_models_own_config_then_the_ensembles(tmp_path, checkpoint):
    """One source per setting, typed, defaults defined once; relative paths resolve against the
    folder of the config that names them, or the working directory for the environment."""
    engine, ensemble = tmp_path / "reward_engine", tmp_path / "reward_model"
    (ensemble / "ckpt").mkdir(parents=True)
    engine.mkdir()
    (ensemble / "config.pbtxt").write_text(
        'name: "reward_model"\nparameters [ { key: "checkpoint", value: { string_value: "ckpt" } },\n'
        '  { key: "max_tokens", value: { string_value: "8192" } }, { key: "dtype", value: { string_value: "bf16" } } ]\n'
    )
    settings = Settings.for_model(engine, {"dtype": "fp32"}, environ={})
    assert settings.checkpoint == str((ensemble / "ckpt").resolve()) and settings.max_tokens == 8192 and settings.dtype == "fp32"
    assert settings.max_step_tokens is None and settings.min_shared_prefix == 64 and settings.runtime == "torch"  # the defaults
    environ = {"REWARD_MAX_TOKENS": "100", "REWARD_CHECKPOINT": str(checkpoint), "REWARD_MAX_STEP_TOKENS": "512", "REWARD_DTYPE": "fp16"}
    settings = Settings.for_model(engine, {"dtype": "fp32"}, environ=environ)
    assert (settings.max_tokens, settings.checkpoint, settings.max_step_tokens, settings.dtype) == (100, str(checkpoint), 512, "fp16")
    with pytest.raises(ValueError, match=r"\$REWARD_RUNTIME: 'onnx' is not one of torch, tensorrt_llm"):
        Settings.for_model(engine, {}, environ={"REWARD_RUNTIME": "onnx"})
    with pytest.raises(ValueError, match=r"reward_engine/config.pbtxt: unknown setting\(s\) \['max_token'\]"):
        Settings.for_model(engine, {"max_token": "1"}, environ={})
    with pytest.raises(ValueError, match=r"folder .*missing does not exist"):
        Settings.for_model(engine, {"checkpoint": "missing"}, environ={})


@pytest.mark.parametrize(
    ("argv", "environ", "said"),
    [
        (["--dtype", "BF16"], {}, "--dtype: 'BF16' is not one of auto"),
        (["--max-turns", "abc"], {}, "--max-turns: 'abc' is not an integer"),
        (["--cuda-graphs", "enabled"], {}, "--cuda-graphs: 'enabled' is not a boolean"),
        (["--checkpoint", "missing-folder"], {}, "--checkpoint: folder"),
        ([], {"REWARD_MIN_SHARED_PREFIX": "-1"}, "$REWARD_MIN_SHARED_PREFIX: -1 is below the minimum 0"),  # set so: named so
    ],
)
def test_the_launcher_refuses_a_bad_setting_before_tritonserver_starts(monkeypatch, capsys, argv, environ, said):
    """It used to pass it on: the models failed at load, the message naming a variable the operator never set."""
    from reward_server.launcher import serve

    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(serve, "supervise", lambda *args: pytest.fail("tritonserver started"))
    with pytest.raises(SystemExit) as exit_:
        serve.main(["--model-repository", str(REPOSITORY), *argv])
    assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_the_repository_names_one_checkpoint_and_restates_no_default():
    """Settings live in the ensemble's config only; the other models' configs carry none."""
    ensemble = read_parameters(REPOSITORY / protocol.ENSEMBLE_MODEL / "config.pbtxt")
    assert ensemble == {"checkpoint": "../../.build/demo-checkpoint"}
    for model in (protocol.PREPROCESSING_MODEL, protocol.ENGINE_MODEL, protocol.NEMO_MODEL):
        assert not load(model).parameters, model
