"""nemo_reward_model's byte limit: the ensemble's `max_bytes`, and memory given back after a request at it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from reward_server import metrics, nemo
from reward_server.launcher.supervisor import stubs
from reward_server.settings import Settings
from tests.live_server import metric
from tests.test_front import tritonserver_pid

LIMIT = Settings().max_bytes


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 / (1 << 20)


def score(server, text: bytes):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput(nemo.SENTENCES, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text]], dtype=np.object_))
    try:
        return client.infer("nemo_reward_model", [tensor], client_timeout=120)
    finally:
        client.close()


def test_a_sentence_over_max_bytes_is_refused_by_name(server):
    """Refused by name, and counted: Triton counts a python model's error answer as a success, so the model's
    own rejection counter is the only trace of it in the metrics."""
    labels = {"model": "nemo_reward_model", "reason": "too_large"}
    before = metric(server.metrics(), metrics.REJECTED, **labels), metric(server.metrics(), metrics.FAILED, model="nemo_reward_model")
    with pytest.raises(InferenceServerException) as caught:
        score(server, b"a" * (LIMIT + 1))
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"{nemo.SENTENCES}[0]: {LIMIT + 1} bytes is over the limit of {LIMIT} bytes" in caught.value.message()
    assert metric(server.metrics(), metrics.REJECTED, **labels) == before[0] + 1
    assert before[1] is not None and metric(server.metrics(), metrics.FAILED, model="nemo_reward_model") == before[1]  # no failure


def test_memory_is_given_back_after_a_request_at_the_limit(server):
    (stub,) = [pid for pid, model in stubs(tritonserver_pid(server)).items() if model == "nemo_reward_model"]
    score(server, b"Warm up.")
    before = rss_mib(stub)
    text = (b"The quick brown fox jumps over the lazy dog. " * (LIMIT // 40))[:LIMIT]
    assert bool(score(server, text).as_numpy(nemo.EXCEEDED)[0, 0])  # scored on its first max_tokens tokens
    deadline = time.monotonic() + 10
    while (after := rss_mib(stub)) > 1.1 * before:
        assert time.monotonic() < deadline, f"nemo_reward_model stub RSS {before:.0f} MiB before, {after:.0f} MiB 10 s after"
        time.sleep(0.5)
    print(f"nemo_reward_model stub RSS: {before:.0f} MiB before, {after:.0f} MiB after a {LIMIT}-byte sentence")


def test_ids_beyond_the_models_embeddings_are_refused_per_request(tmp_path, checkpoint):
    """A tokenizer larger than the model's embedding table (its config's vocab_size): an id in between passed, and
    the engine then refused the whole call of up to 64 rows, other requests' too. Refused here, by row."""
    import json
    import shutil

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    shutil.copy(Path(checkpoint) / "config.json", tmp_path / "config.json")
    config = json.loads((tmp_path / "config.json").read_text())
    assert nemo.vocabulary(tokenizer, tmp_path) == min(len(tokenizer), config["vocab_size"])
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    vocabulary = nemo.vocabulary(tokenizer, tmp_path)
    assert vocabulary == 1000
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 1000, "text_config": None}))  # as some configs write it
    assert nemo.vocabulary(tokenizer, tmp_path) == 1000
    tokens, lengths = np.array([[5, 6, 999], [5, 6, 1000]], dtype=np.int64), np.array([[3], [3]], dtype=np.int64)
    rows = nemo.request_rows(tokenizer, None, None, tokens[:1], lengths[:1], vocabulary=vocabulary)
    assert rows[0].tolist() == [5, 6, 999] and rows[0].dtype == np.int32
    with pytest.raises(nemo.RequestError, match=r"row 1: token ids must lie in \[0, 1000\)"):
        nemo.request_rows(tokenizer, None, None, tokens, lengths, vocabulary=vocabulary)
    sentence = np.array([[b"a sentence whose ids go past 1000"]], dtype=np.object_)  # byte-level BPE: ids past 1000
    with pytest.raises(nemo.RequestError, match=r"row 0: token ids must lie in \[0, 1000\)"):
        nemo.request_rows(tokenizer, sentence, None, None, None, vocabulary=vocabulary)
