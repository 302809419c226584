"""The model repository's configs parse as Triton ModelConfig and use the shared tensor names."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from reward_client import protocol
from reward_client.protocol import parse_bool, parse_int, read_parameters

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


def load(model: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((REPOSITORY / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def names(tensors) -> set[str]:
    return {t.name for t in tensors}


def test_tensor_names_match_protocol():
    pre, engine, ensemble = load(protocol.PREPROCESSING_MODEL), load(protocol.ENGINE_MODEL), load(protocol.ENSEMBLE_MODEL)
    scores = {protocol.REWARD, protocol.ATTRIBUTES, protocol.ATTRIBUTE_NAMES, protocol.TURN_REWARDS, protocol.TURN_ATTRIBUTES}
    assert names(pre.input) == names(ensemble.input) == {protocol.CONVERSATION, protocol.SCORE_TURNS}
    assert names(pre.output) == {protocol.INPUT_IDS, protocol.NUM_TOKENS, protocol.SCORE_AT}
    assert names(engine.input) == {protocol.INPUT_IDS, protocol.NUM_TOKENS, protocol.SCORE_AT}
    assert names(engine.output) == scores
    assert names(ensemble.output) == scores | {protocol.NUM_TOKENS}
    assert [t.name for t in ensemble.input if t.optional] == [protocol.SCORE_TURNS]
    assert [step.model_name for step in ensemble.ensemble_scheduling.step] == [protocol.PREPROCESSING_MODEL, protocol.ENGINE_MODEL]


def test_engine_batches_ragged_requests():
    engine = load(protocol.ENGINE_MODEL)
    assert engine.max_batch_size > 1 and engine.HasField("dynamic_batching")
    ids = next(t for t in engine.input if t.name == protocol.INPUT_IDS)
    assert ids.allow_ragged_batch and list(ids.dims) == [-1]


def test_parameters_are_read_once_with_one_meaning():
    config = {"parameters": {"a": {"string_value": "TRUE"}, "n": {"string_value": "12"}}}
    parameters = read_parameters(config)
    assert parse_bool(parameters["a"], "a") is True
    assert parse_bool("off", "x") is False
    assert parse_int(parameters["n"], "n") == 12
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("maybe", "x")
    with pytest.raises(ValueError, match="below the minimum"):
        parse_int("0", "n")


def test_runtime_comes_from_the_environment_first(monkeypatch):
    from reward_client.protocol import resolve_runtime

    assert resolve_runtime("") == "torch"
    monkeypatch.setenv("REWARD_RUNTIME", "tensorrt_llm")
    assert resolve_runtime("torch") == "tensorrt_llm"
    monkeypatch.setenv("REWARD_RUNTIME", "onnx")
    with pytest.raises(ValueError, match="expected one of torch, tensorrt_llm"):
        resolve_runtime("torch")
