"""Tensor parallelism on CPU (gloo): TP 2 and 4 equal one device on every architecture family, bit-for-bit
batch invariance under TP, the split's refusals, a dead rank, and TP 2 through the real server with a
rank killed under load."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

from reward_server import metrics
from reward_server.errors import EngineError
from reward_server.parallel import shard_plan
from tests.corpus import conversations
from tests.live_server import start_server, stop_server
from tests.test_architectures import CONFIGS, _engine, _save, _sequences
from tests.test_faults import Load, stubs_of

TP_TOLERANCE = 1e-5  # fp32: only the order of the row-parallel sums differs


def _per_turn(sequences):
    return [np.array(sorted({len(s) // 3, len(s) // 2, len(s) - 1})) for s in sequences]


def _compare(folder, sequences, sizes=(2, 4)):
    """Scores at the last token (with prefix reuse) and at several positions, TP N against one device."""
    one = _engine(folder)
    assert any(step.prefixes for step in one.plan(sequences))  # the best-of-4 group shares its prompt
    expected = [one.score(sequences), one.score(sequences, _per_turn(sequences))]
    for size in sizes:
        engine = _engine(folder, tensor_parallel=size)
        try:
            got = [engine.score(sequences), engine.score(sequences, _per_turn(sequences))]
        finally:
            engine.close()
        worst = max(np.abs(g - e).max() for g, e in zip(got, expected, strict=True))
        print(f"TP {size}: max |TP - one device| {worst:.1e} (largest score {np.abs(expected[0]).max():.1f})")
        assert worst <= TP_TOLERANCE, f"TP {size}: {worst:.2e}"


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_tensor_parallel_equals_one_device(family, tmp_path):
    """Causal-LM reward (the -HF layout) on Llama, Nemotron, Mistral, Qwen2 and Gemma 2; 2 KV heads, so
    TP 4 replicates each KV head on two ranks."""
    torch.manual_seed(11)
    _compare(_save(AutoModelForCausalLM.from_config(CONFIGS[family]()), tmp_path), _sequences(11))


def test_tensor_parallel_classifier_and_separate_head(tmp_path):
    """A Qwen2 sequence classifier (q/k/v biases split with their rows) and a 9-output separate head."""
    config = CONFIGS["qwen2"]()
    config.num_labels, config.id2label, config.label2id = 2, {0: "a", 1: "b"}, {"a": 0, "b": 1}
    torch.manual_seed(12)
    _compare(_save(AutoModelForSequenceClassification.from_config(config), tmp_path / "classifier"), _sequences(12), sizes=(2,))
    torch.manual_seed(13)
    head = {"weight": torch.randn(9, 64) / 8, "bias": torch.randn(9)}  # outputs of order 1, as a trained head's
    spec = {"attributes": [f"a{i}" for i in range(9)], "reward": {"index": 4}}
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path / "separate", spec, head)
    _compare(folder, _sequences(13), sizes=(2,))


def test_batch_invariance_under_tensor_parallel(tmp_path):
    """TP 4 (three or more partial sums per element: a ring all_reduce would not be invariant): each
    sequence alone and packed in mixed batches, bit for bit."""
    torch.manual_seed(14)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    sequences = _sequences(14)[:5]
    engine = _engine(folder, tensor_parallel=4)
    try:
        alone = np.concatenate([engine.score([s]) for s in sequences])
        together = engine.score(sequences)
        reversed_ = engine.score(sequences[::-1])[::-1]
        waited = engine.device_wait  # rank 0's, passed on with its outputs
    finally:
        engine.close()
    assert np.array_equal(alone, together) and np.array_equal(alone, reversed_)
    assert waited is not None and waited >= 0


def test_splits_that_cannot_work_are_refused():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    assert shard_plan(config, 2) == (2, 1, 64) and shard_plan(config, 4) == (1, 1, 32)
    with pytest.raises(ValueError, match="attention heads 4, MLP size 128 not divisible by 3"):
        shard_plan(config, 3)
    config = LlamaConfig(hidden_size=96, intermediate_size=96, num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ValueError, match="3 KV heads can be neither split across nor replicated on 2 ranks"):
        shard_plan(config, 2)


def test_a_rank_that_cannot_load_fails_the_load_with_its_reason(tmp_path):
    """Any rank's load error is the engine's ValueError, with its reason (an OSError or AttributeError was "rank 0
    died", and in a server, which exits on a rank's failure, the process exited inside initialize)."""
    from tests.test_architectures import TREATED_LOGITS

    torch.manual_seed(16)
    phi = _save(AutoModelForCausalLM.from_config(TREATED_LOGITS["phi"]()), tmp_path / "phi")
    cases = [(phi, "tensor_parallel 2: PhiDecoderLayer has no self_attn.o_proj"), (tmp_path / "missing", "OSError")]
    for folder, reason in cases:
        with pytest.raises(ValueError, match=reason):
            _engine(str(folder), tensor_parallel=2, exit_on_rank_failure=True)


def test_a_dead_rank_fails_the_engine(tmp_path):
    """A rank killed between steps: the engine's next step raises EngineError naming it, promptly."""
    torch.manual_seed(15)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path)
    engine = _engine(folder, tensor_parallel=2)
    try:
        engine.score(_sequences(15)[:2])
        victim = engine.ranks.processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=30)
        with pytest.raises(EngineError, match="rank"):
            engine.score(_sequences(15)[:2])
    finally:
        engine.close()
    assert not any(p.is_alive() for p in engine.ranks.processes)


def _ranks_of(stub: int) -> list[int]:
    """The engine's TP ranks: the children of its fork server, the stub's child."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            children.setdefault(int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return [rank for server in children.get(stub, []) for rank in children.get(server, [])]


def test_tensor_parallel_server_rides_out_a_killed_rank(tmp_path, checkpoint, reference_reward):
    """REWARD_TENSOR_PARALLEL=2: scores equal the reference; a rank killed under load takes the engine
    stub down, the supervisor restarts the server, and the clients' answers stay right throughout."""
    convs = conversations()[:6]
    expected = np.array([reference_reward(c) for c in convs])
    server = start_server(tmp_path / "server.log", env={"REWARD_CHECKPOINT": str(checkpoint), "REWARD_TENSOR_PARALLEL": "2"})
    try:
        load = Load(server.grpc_url, convs)
        try:
            load.wait_for(2, 120)
            assert len(load.results) >= 2 and not load.errors, load.errors[:3]
            engine = [pid for pid, cmdline in stubs_of(server.process.pid).items() if b"reward_engine" in cmdline]
            ranks = _ranks_of(engine[0])
            assert len(ranks) == 2, ranks
            before = len(load.results)
            killed = time.monotonic()
            os.kill(ranks[1], signal.SIGKILL)
            load.wait_for(before + 4, 240)
            print(f"rank killed; {len(load.results) - before} batches answered {time.monotonic() - killed:.1f} s later")
        finally:
            load.finish()
        assert not load.errors and len(load.results) >= before + 4, f"the server did not come back: {load.errors[:3]}"
        assert all(np.abs(scores - expected).max() <= 1e-4 for scores in load.results)  # before, during, after
        log = server.log.read_text()
        assert "tensor-parallel rank" in log and "restarting tritonserver" in log
    finally:
        stop_server(server)


def _steps_by_instance(server) -> dict[str, float]:
    """reward_engine's steps so far, per instance label, from :8002."""
    steps = [s for s in server.metrics() if s.name == f"{metrics.STEP_TOKENS}_count" and "engine_instance" in s.labels]
    return {s.labels["engine_instance"]: s.value for s in steps}


def test_two_engine_instances_of_tensor_parallel_2_both_serve(tmp_path, checkpoint, reference_reward):
    """`--engine-instances 2 --tensor-parallel 2` (data x tensor parallelism, 4 gloo ranks): two engine stubs
    with two ranks each; under concurrent load both instances run steps, and every answer equals the
    reference, the same bits whichever instance scored it."""
    convs = conversations()[:6]
    expected = np.array([reference_reward(c) for c in convs])
    options = ["--engine-instances", "2", "--tensor-parallel", "2"]
    server = start_server(tmp_path / "server.log", env={"REWARD_CHECKPOINT": str(checkpoint)}, options=options)
    try:
        engines = [pid for pid, cmdline in stubs_of(server.process.pid).items() if b"reward_engine" in cmdline]
        assert len(engines) == 2 and all(len(_ranks_of(stub)) == 2 for stub in engines), engines
        load = Load(server.grpc_url, convs, workers=3)
        try:
            deadline = time.monotonic() + 180
            while not load.errors and time.monotonic() < deadline:
                steps = _steps_by_instance(server)
                if len(steps) == 2 and min(steps.values()) > 0:
                    break
                time.sleep(0.5)
        finally:
            load.finish()
        assert not load.errors, load.errors[:3]
        assert sorted(steps) == ["reward_engine_0_0", "reward_engine_0_1"] and min(steps.values()) > 0, steps
        assert all(np.array_equal(scores, load.results[0]) for scores in load.results)  # batch and instance invariant
        assert np.abs(load.results[0] - expected).max() <= 1e-4
    finally:
        stop_server(server)
