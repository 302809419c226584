"""build/trtllm_checkpoint.py on a CPU: the TensorRT-LLM checkpoint it writes, read back by a pure-torch
Llama forward on TensorRT-LLM's names, scores like the transformers reference (fp32, within 1e-5)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import REPO
from trtllm_reader import TrtllmCheckpoint

sys.path.insert(0, str(REPO / "build"))
from trtllm_checkpoint import convert

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(11)
    return [rng.integers(0, 128000, n) for n in (1, 9, 130, 700)]


@pytest.fixture(scope="module")
def hf_logits(checkpoint, sequences):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        return np.stack([model(torch.from_numpy(s)[None]).logits[0, -1, :9].numpy() for s in sequences])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_converted_checkpoint_scores_like_the_reference(checkpoint, tmp_path, sequences, hf_logits, tp):
    """-HF layout; tp 4 exceeds the demo's 2 key/value heads, so they are repeated per rank."""
    config = convert(checkpoint, tmp_path, tp=tp, dtype="float32")
    assert sorted(p.name for p in tmp_path.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp)]
    assert config["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    assert config["rotary_scaling"]["type"] == "llama3" and config["rotary_base"] == 500000.0
    assert json.loads((tmp_path / "reward_head.json").read_text()) == {"attributes": ["reward"], "reward": {"weights": [1.0]}}
    got = np.stack([TrtllmCheckpoint(tmp_path).rewards(s) for s in sequences])
    worst = np.abs(got[:, 0] - hf_logits[:, 0]).max()
    print(f"tp {tp}: max |converted - reference| = {worst:.2e}")
    assert worst <= TOLERANCE


def test_lm_head_keeps_the_vocabulary_with_reward_rows_first(checkpoint, tmp_path):
    convert(checkpoint, tmp_path, tp=2, dtype="float32")
    shards = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    head = torch.cat([s["lm_head.weight"] for s in shards])
    assert head.shape == (128256, 256)
    original = load_file(checkpoint / "model.safetensors")["lm_head.weight"]
    assert torch.equal(head[0], original[0])
    assert not head[1:].any()
    q_rows = 8 // 2 * 32  # this rank's 4 query heads; then 1 key and 1 value head
    assert shards[0]["transformer.layers.0.attention.qkv.weight"].shape == (q_rows + 2 * 32, 256)


def test_separate_head_with_bias_is_folded(tmp_path, sequences):
    """A 9-output head with bias beside the trunk: rows 0..8 of lm_head, the bias in reward_head.json."""
    steerlm = REPO / ".build" / "steerlm-checkpoint"
    if not (steerlm / "reward_head.safetensors").exists():
        pytest.fail("no SteerLM demo checkpoint: run `make setup`")
    convert(steerlm, tmp_path, tp=2, dtype="float32")
    head = load_file(steerlm / "reward_head.safetensors")
    description = json.loads((tmp_path / "reward_head.json").read_text())
    assert description["attributes"][4] == "helpfulness" and description["reward"]["weights"][4] == 1.0
    assert np.allclose(description["bias"], head["bias"].numpy())
    trunk = AutoModelForCausalLM.from_pretrained(steerlm, dtype=torch.float32, attn_implementation="eager").model.eval()
    reader = TrtllmCheckpoint(tmp_path)
    for s in sequences[:3]:
        with torch.inference_mode():
            expected = trunk(torch.from_numpy(s)[None]).last_hidden_state[0, -1] @ head["weight"].T + head["bias"]
        assert np.abs(reader.rewards(s) - expected.numpy()).max() <= TOLERANCE


def test_conversion_refuses_what_it_cannot_convert(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="does not divide"):
        convert(checkpoint, tmp_path / "a", tp=3)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ValueError, match="only LlamaForCausalLM"):
        convert(other, tmp_path / "b")
    both = tmp_path / "both"
    both.mkdir()
    for name in ("config.json", "model.safetensors"):
        (both / name).symlink_to(checkpoint / name)
    save_file({"weight": torch.zeros(1, 256), "bias": torch.zeros(1)}, both / "reward_head.safetensors")
    (both / "reward_head.json").write_text(json.dumps({"bias": [1.0]}))
    with pytest.raises(ValueError, match="bias given twice"):
        convert(both, tmp_path / "c", dtype="float32")


def test_engine_build_commands(tmp_path):
    """`make engine`'s command lines carry the flags the reward read depends on (TensorRT-LLM 1.0)."""
    from trtllm_engine import commands

    convert, build = commands(REPO / "ckpt", tmp_path, tp=8, dtype="bf16", max_num_tokens=16384, examples=None)
    assert convert[1].endswith("trtllm_checkpoint.py") and convert[convert.index("--tp") + 1] == "8"
    assert build[0] == "trtllm-build" and "--tp_size" not in build  # parallelism is fixed at conversion
    flags = dict(zip(build[1::2], build[2::2], strict=False))
    assert "--gather_generation_logits" in build and "--gather_context_logits" not in build
    assert build[build.index("--logits_dtype") + 1] == "float32"
    assert build[build.index("--max_input_len") + 1] == "4096" and build[build.index("--max_seq_len") + 1] == "4097"
    assert build[build.index("--max_num_tokens") + 1] == "16384" and flags["--checkpoint_dir"] == str(tmp_path / "trtllm-checkpoint")
    quantize, fp8_build = commands(REPO / "ckpt", tmp_path, tp=1, dtype="fp8", max_num_tokens=8192, examples=tmp_path / "examples")
    assert quantize[1] == str(tmp_path / "examples" / "quantization" / "quantize.py")
    assert quantize[quantize.index("--qformat") + 1] == "fp8" and quantize[quantize.index("--tp_size") + 1] == "1"
    assert "--use_fp8_context_fmha" in fp8_build
    with pytest.raises(ValueError, match="TRTLLM_EXAMPLES"):
        commands(REPO / "ckpt", tmp_path, tp=1, dtype="fp8", max_num_tokens=8192, examples=None)
