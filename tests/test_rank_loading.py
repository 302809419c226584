"""Each tensor-parallel rank reads only its share of a checkpoint (rank_loading.py): the same tensors as
loading it whole and cutting, on every family, tied heads, classifiers, sharded safetensors; `.bin`
checkpoints fall back to the whole load with a warning; and a rank's memory follows its share."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

from reward_server.heads import load_reward_model
from reward_server.parallel import shard_trunk
from tests.test_architectures import CONFIGS

WORLD = 2


def _whole_and_cut(auto, folder, rank: int):
    model = auto.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return shard_trunk(model.base_model, rank, WORLD).state_dict()


def _assert_same(folder, auto=AutoModelForCausalLM):
    for rank in range(WORLD):
        trunk, _ = load_reward_model(str(folder), torch.float32, "eager", (rank, WORLD))
        got, expected = trunk.state_dict(), _whole_and_cut(auto, folder, rank)
        assert sorted(got) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor) and got[name].dtype == tensor.dtype, name
            assert got[name].untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), f"{name} holds more than its part"


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_rank_reads_exactly_its_part(family, tmp_path, capfd):
    """Gemma 2 ties its head to the embedding: the one tensor is read once for both names."""
    torch.manual_seed(30)
    AutoModelForCausalLM.from_config(CONFIGS[family]()).save_pretrained(tmp_path)
    _assert_same(tmp_path)
    assert "loads the whole checkpoint" not in capfd.readouterr().err


def test_classifiers_and_sharded_safetensors(tmp_path, capfd):
    torch.manual_seed(31)
    config = CONFIGS["qwen2"]()
    config.num_labels = 3
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    _assert_same(tmp_path, AutoModelForSequenceClassification)
    assert "loads the whole checkpoint" not in capfd.readouterr().err


def test_a_checkpoint_without_safetensors_is_loaded_whole_with_a_warning(tmp_path, capfd):
    torch.manual_seed(32)
    AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")  # transformers 5 writes no .bin
    (tmp_path / "model.safetensors").unlink()
    _assert_same(tmp_path)
    assert "no model.safetensors or model.safetensors.index.json; every tensor-parallel rank loads the whole" in capfd.readouterr().err


# VmHWM: the peak resident memory of this process image (ru_maxrss would include the forking parent's)
PEAK = """
import sys, torch
from transformers import AutoModelForCausalLM
from reward_server.heads import load_reward_model
from reward_server.parallel import shard_trunk
def peak():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024
before = peak()
if sys.argv[2] == "parts":
    load_reward_model(sys.argv[1], torch.float32, "eager", (0, 8))
else:
    shard_trunk(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).model, 0, 8)
print(peak() - before)
"""


def test_a_ranks_memory_follows_its_share(tmp_path):
    """A bf16 checkpoint of 190 MiB served in fp32 at TP 8: the whole load's peak holds the whole model in fp32
    (380 MiB, and more) in every rank; reading its part keeps a rank's peak under half that (its part in fp32,
    and the checkpoint's pages it reads, which the page cache shares between ranks)."""
    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4)
    config.vocab_size = 4096
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    peaks = {}
    for way in ("parts", "whole"):
        run = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path), way], capture_output=True, text=True, check=True)
        peaks[way] = int(run.stdout.split()[-1])
    parts, whole = peaks["parts"] >> 20, peaks["whole"] >> 20
    print(f"checkpoint {size >> 20} MiB (bf16); peak growth of rank 0 of 8 in fp32: parts {parts} MiB, whole {whole} MiB")
    assert peaks["whole"] >= 2 * size  # the whole model in fp32
    assert peaks["parts"] <= 0.5 * peaks["whole"]
