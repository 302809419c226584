"""Build a toy reward checkpoint laid out like nvidia/Llama-3.1-Nemotron-70B-Reward-HF.

Llama-3.1 architecture at toy size (grouped-query attention, rope_theta 500000, llama3 rope
scaling), random weights from a fixed seed, the real Llama 3 tokenizer converted from the
`tokenizer.model` that `llama-models` ships, and the Llama 3.1 Instruct chat template.
The reward is the logit of token id 0 at the last position, as in the -HF checkpoint.
Scores are meaningless; every code path that reads the checkpoint is real.

`--layout steerlm` instead builds a NeMo-Aligner-style reward model: the SteerLM prompt format
(<extra_id_0..2> added as special tokens, build/steerlm_chat_template.jinja) and a separate
9-attribute head with bias (reward_head.safetensors + reward_head.json, reward = helpfulness).

    python build/demo_checkpoint.py --out .build/demo-checkpoint [--preset bench] [--layout steerlm]
    # On a GPU machine, the Llama-3.1-8B shape in bf16, reusing an already converted tokenizer:
    python build/demo_checkpoint.py --preset llama8b --device cuda --dtype bf16 --tokenizer-from .build/demo-checkpoint --out /tmp/rm-8b
    # A CPU stand-in for that checkpoint's sensitivity to rounding (FP8 fidelity studies, README):
    python build/demo_checkpoint.py --preset deep --tokenizer-from .build/demo-checkpoint --out /tmp/deep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = Path(__file__).with_name("llama31_chat_template.jinja")
STEERLM_TEMPLATE = Path(__file__).with_name("steerlm_chat_template.jinja")
STEERLM_TOKENS = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
# NeMo-Aligner's ALL_STEERLM_ATTRIBUTES: the order of Llama-3.1-Nemotron-70B-Reward's 9-output head.
STEERLM_ATTRIBUTES = ["quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence", "complexity", "verbosity"]

# Sizes: "demo" is what `make serve` and the tests use; "bench" has ~27 M non-embedding parameters.
# Weights are transformers' initialisation (normal, initializer_range 0.02 unless the preset says).
PRESETS = {
    "demo": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
    "bench": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    # The 8B's depth and per-layer gain (0.02 x sqrt(4096) = 1.28) at a CPU's width: as sensitive to rounding
    # as the 8B checkpoint (its bf16 and FP8 agreement with fp32 match the H200's 8B figures), for fidelity studies.
    "deep": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=32, num_attention_heads=8, num_key_value_heads=2)
    | dict(initializer_range=0.0566),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Llama 3.1's own rope settings (config.json of Llama-3.1-70B-Instruct).
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The Llama 3 tiktoken BPE as a transformers fast tokenizer, special tokens at their real ids."""
    from llama_models.llama3 import tokenizer as llama3_tokenizer
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    reference = llama3_tokenizer.Tokenizer.get_instance()
    specials = sorted(reference.special_tokens, key=reference.special_tokens.get)
    model_file = Path(llama3_tokenizer.__file__).with_name("tokenizer.model")
    backend = TikTokenConverter(vocab_file=str(model_file), extra_special_tokens=specials).converted()
    bos = "<|begin_of_text|>"
    # Like Meta's tokenizer.json: encode(..., add_special_tokens=True) prepends <|begin_of_text|>.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, reference.bos_id)]),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=True,
    )
    tokenizer.chat_template = CHAT_TEMPLATE.read_text()
    for token, token_id in reference.special_tokens.items():
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(f"special token {token} landed at {tokenizer.convert_tokens_to_ids(token)}, not {token_id}")
    return tokenizer


def to_steerlm(tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer.add_special_tokens({"additional_special_tokens": STEERLM_TOKENS})
    tokenizer.chat_template = STEERLM_TEMPLATE.read_text()


def write_steerlm_head(out: Path, hidden_size: int, seed: int) -> None:
    """A 9-output head with bias beside the trunk, scaled so outputs spread over the 0-4 label range."""
    generator = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(len(STEERLM_ATTRIBUTES), hidden_size, generator=generator) * hidden_size**-0.5
    bias = torch.full((len(STEERLM_ATTRIBUTES),), 2.0)
    save_file({"weight": weight, "bias": bias}, out / "reward_head.safetensors")
    spec = {"attributes": STEERLM_ATTRIBUTES, "reward": {"index": STEERLM_ATTRIBUTES.index("helpfulness")}}
    (out / "reward_head.json").write_text(json.dumps(spec, indent=2) + "\n")


def build_model(preset: str, seed: int, device: str = "cpu", dtype: str = "fp32", vocab_size: int = 128256) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters=dict(LLAMA31_ROPE),
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        tie_word_embeddings=False,
        **PRESETS[preset],
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config).to(DTYPES[dtype]).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model size (default: demo)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="saved weight dtype (default: fp32)")
    parser.add_argument("--tokenizer-from", type=Path, help="copy the tokenizer of this checkpoint instead of converting")
    parser.add_argument("--layout", choices=["hf", "steerlm"], default="hf", help="reward layout (default: hf)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_from) if args.tokenizer_from else build_tokenizer()
    if args.layout == "steerlm":
        to_steerlm(tokenizer)
    tokenizer.save_pretrained(args.out)
    model = build_model(args.preset, args.seed, args.device, args.dtype, vocab_size=max(128256, len(tokenizer)))
    model.save_pretrained(args.out)
    if args.layout == "steerlm":
        write_steerlm_head(args.out, model.config.hidden_size, args.seed)
    stamp = {"preset": args.preset, "seed": args.seed, "layout": args.layout, "note": "random weights: scores are meaningless"}
    (args.out / "demo_checkpoint.json").write_text(json.dumps(stamp, indent=2) + "\n")
    print(f"demo checkpoint ({args.preset}, {args.layout}, seed {args.seed}) written to {args.out}")


if __name__ == "__main__":
    main()
