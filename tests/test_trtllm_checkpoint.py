"""build/trtllm_checkpoint.py on a CPU: the TensorRT-LLM checkpoint it writes, read back by a pure-torch
Llama forward on TensorRT-LLM's names, scores like the transformers reference (fp32, within 1e-5)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.live_server import REPO
from tests.trtllm_reader import TrtllmCheckpoint

TOLERANCE = 1e-5


def convert(checkpoint, out, tp=1, dtype=None) -> dict:
    """build/trtllm_checkpoint.py as users run it; ValueError with its error line if it refuses."""
    command = [
        sys.executable,
        str(REPO / "build" / "trtllm_checkpoint.py"),
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--tp",
        str(tp),
    ]
    done = subprocess.run([*command, *(["--dtype", dtype] if dtype else [])], capture_output=True, text=True)
    if done.returncode:
        raise ValueError(done.stderr.strip().splitlines()[-1])
    return json.loads((out / "config.json").read_text())


def engine_commands(*options: str) -> list[list[str]]:
    """The command lines `build/trtllm_engine.py --dry-run` prints."""
    command = [sys.executable, str(REPO / "build" / "trtllm_engine.py"), "--dry-run", *options]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise ValueError(done.stderr.strip().splitlines()[-1])
    return [shlex.split(line[2:]) for line in done.stdout.splitlines() if line.startswith("+ ")]


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


def test_separate_head_with_bias_is_folded(steerlm, tmp_path, sequences):
    """A 9-output head with bias beside the trunk: rows 0..8 of lm_head, the bias in reward_head.json."""
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


def test_engine_build_commands(tmp_path, monkeypatch):
    """`make engine`'s command lines carry the flags the reward read depends on (TensorRT-LLM 1.0)."""
    monkeypatch.delenv("TRTLLM_EXAMPLES", raising=False)
    convert, build = engine_commands("--checkpoint", str(REPO / "ckpt"), "--out", str(tmp_path), "--tp", "8")
    assert convert[1].endswith("trtllm_checkpoint.py") and convert[convert.index("--tp") + 1] == "8"
    assert build[0] == "trtllm-build" and "--tp_size" not in build  # parallelism is fixed at conversion
    flags = dict(zip(build[1::2], build[2::2], strict=False))
    assert "--gather_generation_logits" in build and "--gather_context_logits" not in build
    assert build[build.index("--logits_dtype") + 1] == "float32"
    assert build[build.index("--max_input_len") + 1] == "4096" and build[build.index("--max_seq_len") + 1] == "4097"
    assert build[build.index("--max_num_tokens") + 1] == "16384" and flags["--checkpoint_dir"] == str(tmp_path / "trtllm-checkpoint")
    monkeypatch.setenv("TRTLLM_EXAMPLES", str(tmp_path / "examples"))
    fp8 = ["--checkpoint", str(REPO / "ckpt"), "--out", str(tmp_path), "--dtype", "fp8", "--max-num-tokens", "8192"]
    quantize, fp8_build = engine_commands(*fp8)
    assert quantize[1] == str(tmp_path / "examples" / "quantization" / "quantize.py")
    assert quantize[quantize.index("--qformat") + 1] == "fp8" and quantize[quantize.index("--tp_size") + 1] == "1"
    assert "--use_fp8_context_fmha" in fp8_build
    # Calibrated on the project's chat conversations in the engine folder, never on the Hub's cnn_dailymail.
    conversations = [line for line in (REPO / "build" / "calibration_conversations.jsonl").read_text().splitlines() if line]
    assert quantize[quantize.index("--calib_dataset") + 1] == str(tmp_path / "calibration")
    assert quantize[quantize.index("--calib_size") + 1] == str(len(conversations)) and len(conversations) >= 20
    assert quantize[quantize.index("--calib_max_seq_length") + 1] == "4096"
    assert engine_commands(*fp8, "--max-tokens", "8192")[1][build.index("--max_input_len") + 1] == "8192"  # the max_tokens setting
    with pytest.raises(ValueError, match="--max-num-tokens 8192 is below --max-tokens 16384"):
        engine_commands(*fp8, "--max-tokens", "16384")
    monkeypatch.delenv("TRTLLM_EXAMPLES")
    with pytest.raises(ValueError, match="TRTLLM_EXAMPLES"):
        engine_commands(*fp8)


def test_server_refuses_an_engine_built_for_shorter_prompts(tmp_path):
    """An engine's max_input_len is fixed by trtllm-build: a server admitting longer prompts (max_tokens) would
    have TensorRT-LLM refuse every request of a batch holding one; it refuses the engine at load instead."""
    from reward_server.runtimes import load_engine
    from reward_server.settings import Settings

    config = {"pretrained_config": {"vocab_size": 128256}, "build_config": {"max_input_len": 4096, "max_seq_len": 4097}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    settings = Settings(checkpoint=tmp_path, runtime="tensorrt_llm", max_tokens=8192)
    with pytest.raises(ValueError, match=r"built with max_input_len 4096 but max_tokens is 8192.*--max-tokens 8192"):
        load_engine(settings)
    with pytest.raises(ImportError, match="tensorrt_llm"):  # within the limit: on to loading it (not here)
        load_engine(Settings(checkpoint=tmp_path, runtime="tensorrt_llm", max_tokens=4096))


def test_fp8_calibration_set_is_what_the_server_scores(checkpoint, tmp_path):
    """The calibration folder as quantize.py reads a local one (TensorRT-LLM 1.0: its train split's `text`
    column, all texts tokenized in one call with special tokens, left-padded to the longest, no attention mask):
    each text is whole conversations back to back in the server's ids, every conversation once, and padding them
    to the longest adds little (one conversation per text: 90 % of the tokens fed were padding)."""
    from transformers import AutoTokenizer

    from reward_server.templating import ChatTokenizer

    command = [sys.executable, str(REPO / "build" / "trtllm_engine.py"), "--checkpoint", str(checkpoint), "--out", str(tmp_path)]
    subprocess.run([*command, "--dtype", "fp8", "--calibration-only"], check=True, capture_output=True)
    rows = [json.loads(line) for line in (tmp_path / "calibration" / "train.jsonl").read_text().splitlines()]
    lines = [line for line in (REPO / "build" / "calibration_conversations.jsonl").read_text().splitlines() if line]
    assert all(set(row) == {"text"} for row in rows) and 1 < len(rows) < len(lines)
    tokenizer, server = AutoTokenizer.from_pretrained(checkpoint), ChatTokenizer(str(checkpoint), max_tokens=1 << 20)
    conversations = {tuple(server.encode(line.encode())[0].tolist()) for line in lines}
    fed = tokenizer([row["text"] for row in rows], padding=True, truncation=True, max_length=4096, return_tensors="pt")
    assert fed.attention_mask.shape[1] <= 4096 and fed.attention_mask.float().mean() > 0.9
    seen = []
    for row in rows:
        ids = tokenizer(row["text"])["input_ids"]
        while ids:  # each conversation starts with the BOS
            end = next((i for i in range(1, len(ids)) if ids[i] == tokenizer.bos_token_id), len(ids))
            seen.append(tuple(ids[:end]))
            ids = ids[end:]
    assert sorted(seen) == sorted(conversations) and len(seen) == len(lines)


@pytest.mark.parametrize(
    ("lengths", "capacity", "rows"),
    [
        ([3100, 900, 800, 700, 600, 400, 90], 4096, [[0, 6], [1, 2, 3, 4, 5]]),
        ([10, 10, 10, 10], 20, [[0, 2], [1, 3]]),
        ([5000, 10, 10], 4096, [[0], [1, 2]]),  # over capacity: alone (quantize.py truncates it)
    ],
)
def test_calibration_rows_are_whole_items_of_near_equal_length(lengths, capacity, rows):
    spec = importlib.util.spec_from_file_location("trtllm_engine", REPO / "build" / "trtllm_engine.py")  # build/: no package
    engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine)
    assert engine.pack_rows(lengths, capacity) == rows


def test_bf16_lm_head_rounds_rewards_to_8_significant_bits():
    """What a bf16 engine does to rewards (docs/tensorrt-llm.md, "Precision of the reward"): each reward
    is rounded to bf16, so at |r| in [8, 16) rewards move in steps of 0.0625; rounding is monotone, so
    two best-of-n candidates never swap order through it, but ones closer than a step can tie."""
    rewards = torch.tensor([8.0, 8.02, 8.04, 8.09, 10.0, 10.03, 15.99, -12.34])
    rounded = rewards.to(torch.bfloat16).float()
    assert rounded.tolist() == [8.0, 8.0, 8.0625, 8.0625, 10.0, 10.0, 16.0, -12.3125]
    grid = torch.linspace(8, 16, 100_001)[:-1]
    assert torch.unique(grid.to(torch.bfloat16).float()).diff().max().item() == 0.0625
    assert (grid.to(torch.bfloat16).float() - grid).abs().max().item() <= 0.03125
    assert torch.all(grid.to(torch.bfloat16).float().diff() >= 0)  # never reorders, only ties
    # Two candidates 0.02 apart at r ≈ 10 tie; 0.07 apart they stay ordered, but their gap reads 0.0625.
    a, b, c = torch.tensor([10.01, 10.03, 10.08]).to(torch.bfloat16).float().tolist()
    assert a == b == 10.0 and c == 10.0625
