"""Build a toy reward checkpoint laid out like nvidia/Llama-3.1-Nemotron-70B-Reward-HF.

Llama-3.1 architecture at toy size (grouped-query attention, rope_theta 500000, llama3 rope
scaling), random weights from a fixed seed, the real Llama 3 tokenizer converted from the
`tokenizer.model` that `llama-models` ships, and the Llama 3.1 Instruct chat template.
The reward is the logit of token id 0 at the last position, as in the -HF checkpoint.
Scores are meaningless; every code path that reads the checkpoint is real.

    python build/demo_checkpoint.py --out .build/demo-checkpoint [--preset bench]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from llama_models.llama3 import tokenizer as llama3_tokenizer
from llama_models.llama3.tokenizer import Tokenizer as LlamaTokenizer
from tokenizers import processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

CHAT_TEMPLATE = Path(__file__).with_name("llama31_chat_template.jinja")
LLAMA_TOKENIZER_MODEL = Path(llama3_tokenizer.__file__).with_name("tokenizer.model")

# Sizes: "demo" is what `make serve` and the tests use; "bench" has ~27 M non-embedding parameters.
PRESETS = {
    "demo": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
    "bench": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),
}

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
    reference = LlamaTokenizer.get_instance()
    specials = sorted(reference.special_tokens, key=reference.special_tokens.get)
    backend = TikTokenConverter(vocab_file=str(LLAMA_TOKENIZER_MODEL), extra_special_tokens=specials).converted()
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


def build_model(preset: str, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128256,
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
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model size (default: demo)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(args.out)
    model = build_model(args.preset, args.seed)
    model.save_pretrained(args.out)
    stamp = {"preset": args.preset, "seed": args.seed, "note": "random weights: scores are meaningless"}
    (args.out / "demo_checkpoint.json").write_text(json.dumps(stamp, indent=2) + "\n")
    print(f"demo checkpoint ({args.preset}, seed {args.seed}) written to {args.out}")


if __name__ == "__main__":
    main()
