"""Checkpoint families: each trunk and head layout against its own transformers reference (fp32, CPU).

Toy checkpoints with random weights are built here: the architectures' own features (sliding
windows, soft-capping, partial rotary, layer-norm variants) are switched on at toy scale so
that ignoring one would move the scores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    CohereConfig,
    Gemma2Config,
    GPT2Config,
    GptOssConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    NemotronConfig,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
)

from reward_server import heads
from reward_server.runtimes.torch_runtime import TorchRewardEngine

VOCAB = 1000
SIZE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,  # large weights: attention patterns matter to the scores
    pad_token_id=VOCAB - 1,  # not 0: a padding row of the (tied) embeddings would zero the reward row
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SIZE),
    "nemotron": lambda: NemotronConfig(**SIZE, partial_rotary_factor=0.5),
    "mistral": lambda: MistralConfig(**SIZE, sliding_window=16),
    "qwen2": lambda: Qwen2Config(**SIZE, use_sliding_window=False),
    "gemma2": lambda: Gemma2Config(
        **SIZE, head_dim=16, sliding_window=16, attn_logit_softcapping=0.5, final_logit_softcapping=5.0, query_pre_attn_scalar=16
    ),
}
TOLERANCE = 1e-4


def _sequences(seed: int = 0) -> list[np.ndarray]:
    """Lengths on both sides of the sliding window, and a best-of-4 group sharing a 80-token prompt."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, VOCAB, 80)
    alone = [rng.integers(0, VOCAB, n) for n in (1, 5, 17, 40, 150)]
    return alone + [np.concatenate([prompt, rng.integers(0, VOCAB, n)]) for n in (3, 10, 25, 60)]


def _save(model, folder, head_spec=None, head_tensors=None):
    torch.manual_seed(0)
    model.save_pretrained(folder)
    if head_spec is not None:
        (folder / "reward_head.json").write_text(json.dumps(head_spec))
    if head_tensors is not None:
        save_file(head_tensors, folder / "reward_head.safetensors")
    return str(folder)


def _engine(folder, **options):
    return TorchRewardEngine(folder, device="cpu", dtype="fp32", max_step_tokens=256, **options)


@torch.inference_mode()
def _logit_zero(reference, sequences) -> np.ndarray:
    """The causal LM's own reward (the -HF convention): logit 0 at each sequence's last position."""
    return np.array([reference(torch.from_numpy(s)[None]).logits[0, -1, 0].item() for s in sequences])


@torch.inference_mode()
def _eager(cls, folder):
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_causal_lm_reward_is_logit_zero(family, tmp_path):
    """-HF convention on every trunk: reward = logit of token 0 at the last position (incl. soft-capping)."""
    torch.manual_seed(1)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS[family]()), tmp_path)
    reference = _eager(AutoModelForCausalLM, folder)
    sequences = _sequences()
    expected = _logit_zero(reference, sequences)
    got = _engine(folder).score(sequences)[:, 0]
    assert np.abs(got - expected).max() <= TOLERANCE, f"{family}: {np.abs(got - expected).max():.2e}"


# Causal LMs whose logits are not lm_head's plain rows: a bias (Phi), a scale (Cohere's logit_scale, Granite's
# logits_scaling). Only for the -HF head: Phi's layers are not the ones tensor parallelism splits.
TREATED_LOGITS = {
    "phi": lambda: PhiConfig(**{k: v for k, v in SIZE.items() if k != "num_key_value_heads"}),
    "cohere": lambda: CohereConfig(**SIZE, logit_scale=0.0625),
    "granite": lambda: GraniteConfig(**SIZE, logits_scaling=8.0),
}


@pytest.mark.parametrize("family", sorted(TREATED_LOGITS))
def test_causal_lm_reward_is_logit_zero_with_its_bias_and_scale(family, tmp_path):
    """The LM's own logit 0, its lm_head bias and logit scale included (the head was lm_head's bare row: Phi's
    rewards off by the bias, Cohere's 16x and Granite's 8x); a family that treats its logits in a way the
    server does not know is refused at load (here: the scale forgotten)."""
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(TREATED_LOGITS[family]())
    if model.lm_head.bias is not None:
        torch.nn.init.normal_(model.lm_head.bias)  # initialized to zeros
    folder = _save(model, tmp_path)
    reference = _eager(AutoModelForCausalLM, folder)
    sequences = _sequences()[:5]
    expected = _logit_zero(reference, sequences)
    got = _engine(folder).score(sequences)[:, 0]
    assert np.abs(got - expected).max() <= TOLERANCE, f"{family}: {np.abs(got - expected).max():.2e}"
    if family == "phi":
        return
    lm_rows = heads._lm_rows
    heads._lm_rows = lambda model, config, rows: (model.get_output_embeddings().weight[:rows].float(), None, None)
    try:
        with pytest.raises(ValueError, match="logits are not lm_head's rows as this server reads them"):
            _engine(folder)
    finally:
        heads._lm_rows = lm_rows


def test_a_trunk_without_decoder_layers_where_they_are_looked_for_is_refused(tmp_path):
    """GPT-2 keeps them in `h`: a clear refusal at load, not an AttributeError."""
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, pad_token_id=VOCAB - 1, num_labels=1)
    folder = _save(AutoModelForSequenceClassification.from_config(config), tmp_path)
    with pytest.raises(ValueError, match="GPT2Model keeps its decoder layers elsewhere than `layers`"):
        _engine(folder)


def test_a_mixture_of_experts_serves_its_logit_zero_and_refuses_fp8(tmp_path):
    """Mixtral's -HF head (its LM reads router_logits: the load-time probe failed with an AttributeError); dtype fp8
    would leave its 3-D expert weights in bf16 (fp8.py swaps nn.Linear layers): refused."""
    torch.manual_seed(4)
    folder = _save(AutoModelForCausalLM.from_config(MixtralConfig(**SIZE, num_local_experts=4, num_experts_per_tok=2)), tmp_path)
    reference = _eager(AutoModelForCausalLM, folder)
    sequences = _sequences()[:5]
    expected = _logit_zero(reference, sequences)
    got = _engine(folder).score(sequences)[:, 0]
    assert np.abs(got - expected).max() <= TOLERANCE
    with pytest.raises(ValueError, match=r"dtype fp8 quantizes nn.Linear layers; layers.0.mlp.experts.\w+ holds 4 experts' weights"):
        TorchRewardEngine(folder, device="cpu", dtype="fp8")


HALF_ROTARY = SIZE["hidden_size"] // SIZE["num_attention_heads"] // 2
GROWING_ROTARY = {  # frequencies that follow the longest sequence of a forward past 64 tokens
    "dynamic": lambda: LlamaConfig(**SIZE, max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "longrope": lambda: Phi3Config(
        **SIZE,
        max_position_embeddings=512,
        original_max_position_embeddings=64,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * HALF_ROTARY, "long_factor": [4.0 + i for i in range(HALF_ROTARY)]},
    ),
}


@pytest.mark.parametrize("kind", sorted(GROWING_ROTARY))
def test_a_rotary_scaling_that_grows_with_the_batch_is_refused_past_its_start(kind, tmp_path):
    """Within 64 tokens the scores are the model's, alone or batched; past it a 40-token sequence scored beside a
    200-token one was rotated as if 200 tokens long (another score): max_tokens above 64 is refused at load."""
    torch.manual_seed(5)
    folder = _save(AutoModelForCausalLM.from_config(GROWING_ROTARY[kind]()), tmp_path)
    reference = _eager(AutoModelForCausalLM, folder)
    sequences = [s for s in _sequences() if len(s) <= 64]
    expected = _logit_zero(reference, sequences)
    engine = _engine(folder, max_tokens=64)
    assert np.abs(engine.score(sequences)[:, 0] - expected).max() <= TOLERANCE
    with pytest.raises(ValueError, match=f"rotary scaling '{kind}' changes its frequencies .* past 64 tokens.*max_tokens to 64"):
        _engine(folder, max_tokens=65)


def test_attention_sinks_are_refused(tmp_path):
    """gpt-oss's learned sinks go to attention as s_aux, which the packed attention does not add: served, its
    scores were off by up to 0.9."""
    config = GptOssConfig(**{**SIZE, "head_dim": 16}, num_local_experts=4, num_experts_per_tok=2, sliding_window=16)
    folder = _save(AutoModelForCausalLM.from_config(config), tmp_path)
    with pytest.raises(ValueError, match=r"attention sinks \(layers.0.self_attn.sinks\)"):
        _engine(folder)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_sequence_classification_reward_model(family, tmp_path):
    """`*ForSequenceClassification`: the raw `score` outputs at the last token, names from id2label."""
    config = CONFIGS[family]()
    config.num_labels, config.id2label = 2, {0: "helpfulness", 1: "safety"}
    config.label2id = {"helpfulness": 0, "safety": 1}
    torch.manual_seed(2)
    folder = _save(AutoModelForSequenceClassification.from_config(config), tmp_path)
    reference = _eager(AutoModelForSequenceClassification, folder)
    sequences = _sequences(1)
    with torch.inference_mode():
        expected = np.stack([reference(torch.from_numpy(s)[None]).logits[0].numpy() for s in sequences])
    engine = _engine(folder)
    assert engine.spec.names == ["helpfulness", "safety"]
    assert np.abs(engine.score(sequences) - expected).max() <= TOLERANCE


def test_classifier_reads_before_trailing_pad_tokens(tmp_path):
    """With pad_token_id set, transformers reads the last non-pad token, also when the pad token is
    the template's own end token; the engine reads the same token, for every read position."""
    config = CONFIGS["llama"]()
    config.num_labels, config.pad_token_id = 1, 7
    torch.manual_seed(6)
    folder = _save(AutoModelForSequenceClassification.from_config(config), tmp_path)
    reference = _eager(AutoModelForSequenceClassification, folder)
    rng = np.random.default_rng(6)
    body = rng.integers(8, VOCAB, 30)
    sequences = [np.concatenate([body, [7]]), np.concatenate([body[:12], [7, 7], body[12:], [7, 7]]), body]
    with torch.inference_mode():
        expected = np.array([reference(torch.from_numpy(s)[None]).logits[0, 0].item() for s in sequences])
    engine = _engine(folder)
    got = engine.score(sequences)[:, 0]
    assert np.abs(got - expected).max() <= TOLERANCE
    assert got[0] == pytest.approx(got[2], abs=1e-5)  # the trailing pad token is not where it reads
    cut = engine.score(sequences[1:2], [np.array([13, len(sequences[1]) - 1])])[:, 0]
    with torch.inference_mode():
        first = reference(torch.from_numpy(sequences[1][:14])[None]).logits[0, 0].item()
    assert np.abs(cut - [first, expected[1]]).max() <= TOLERANCE


def test_single_output_classifier_is_named_reward(tmp_path):
    config = CONFIGS["llama"]()
    config.num_labels = 1
    folder = _save(AutoModelForSequenceClassification.from_config(config), tmp_path)
    assert _engine(folder).spec.names == ["reward"]


def test_separate_head_with_bias_and_index(tmp_path):
    """NeMo-style: a 9-output head (weight + bias) beside a causal LM trunk; the reward is output 4."""
    from transformers import AutoModel

    names = ["quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    head = {"weight": torch.randn(9, 64), "bias": torch.randn(9)}
    folder = _save(model, tmp_path, {"attributes": names, "reward": {"index": 4}}, head)
    trunk = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    sequences = _sequences(2)
    with torch.inference_mode():
        hidden = torch.stack([trunk(torch.from_numpy(s)[None]).last_hidden_state[0, -1] for s in sequences])
    expected = (hidden @ head["weight"].T + head["bias"]).numpy()
    engine = _engine(folder)
    got = engine.score(sequences)
    assert engine.spec.names == names
    assert np.abs(got - expected).max() <= TOLERANCE
    assert np.allclose(engine.spec.reward(got), got[:, 4])


def test_lm_head_rows_with_weighted_reward(tmp_path):
    """Several attributes in lm_head rows 0..N-1 (the folded layout), their bias, and a weighted reward."""
    torch.manual_seed(4)
    spec = {"attributes": ["a", "b", "c"], "reward": {"weights": [0.5, -1.0, 2.0]}, "bias": [0.25, 0.0, -3.0]}
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["qwen2"]()), tmp_path, spec)
    reference = _eager(AutoModelForCausalLM, folder)
    sequences = _sequences(3)
    with torch.inference_mode():
        expected = np.stack([reference(torch.from_numpy(s)[None]).logits[0, -1, :3].numpy() for s in sequences]) + spec["bias"]
    engine = _engine(folder)
    got = engine.score(sequences)
    assert np.abs(got - expected).max() <= TOLERANCE
    rewards = engine.spec.reward(got)
    assert np.allclose(rewards, got @ np.array([0.5, -1.0, 2.0], dtype=np.float32), atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"attributes": ["a", "a"]}, "distinct"),
        ({"attributes": ["a"], "reward": {"index": 1}}, "index"),
        ({"attributes": ["a", "b"], "reward": {"weights": [1.0]}}, "2 finite numbers"),
        ({"labels": ["a"]}, "keys from"),
        ({"attributes": ["a", "b"], "bias": [1.0, "x"]}, "bias: expected 2 finite"),
    ],
)
def test_bad_head_descriptions_fail_at_load(spec, message, tmp_path):
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path, spec)
    with pytest.raises(ValueError, match=message):
        _engine(folder)


def test_head_of_the_wrong_width_fails_at_load(tmp_path):
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS["llama"]()), tmp_path, None, {"weight": torch.randn(2, 32)})
    with pytest.raises(ValueError, match="hidden size 64"):
        _engine(folder)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_per_position_reads_equal_truncated_sequences(family, tmp_path):
    """Reading several positions of one sequence equals scoring each truncation alone; the prefix
    reuse and sliding window stay exact when reads sit inside a shared prompt."""
    torch.manual_seed(5)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS[family]()), tmp_path)
    reference = _eager(AutoModelForCausalLM, folder)
    sequences = _sequences(4)
    positions = [np.array(sorted({len(s) // 3, len(s) // 2, len(s) - 1})) for s in sequences]
    with torch.inference_mode():  # causal: the logits at p are those of the sequence cut after p
        expected = np.concatenate(
            [reference(torch.from_numpy(s)[None]).logits[0, p, :1].numpy() for s, p in zip(sequences, positions, strict=True)]
        )
    got = _engine(folder, min_shared_prefix=8).score(sequences, positions)
    assert got.shape == (sum(len(p) for p in positions), 1)
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_two_prefix_groups_longer_than_the_window_in_one_step(family, tmp_path):
    """Two best-of-3 groups, each over an 80-token prompt (window 16), packed into one step: every
    prefix's cached keys/values stay whole, so each score equals the reference."""
    torch.manual_seed(7)
    folder = _save(AutoModelForCausalLM.from_config(CONFIGS[family]()), tmp_path)
    reference = _eager(AutoModelForCausalLM, folder)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, VOCAB, 80), rng.integers(0, VOCAB, 90)]
    sequences = [np.concatenate([p, rng.integers(0, VOCAB, n)]) for p in prompts for n in (4, 9, 20)]
    engine = _engine(folder, min_shared_prefix=8)
    assert len(engine.plan(sequences)) == 1 and len(engine.plan(sequences)[0].prefixes) == 2
    expected = _logit_zero(reference, sequences)
    assert np.abs(engine.score(sequences)[:, 0] - expected).max() <= TOLERANCE
