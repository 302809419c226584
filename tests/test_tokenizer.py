"""The demo checkpoint's tokenizer equals llama_models' own Llama 3 tokenizer."""

from __future__ import annotations

import random

import pytest
from llama_models.llama3.tokenizer import Tokenizer as LlamaTokenizer

from tests.corpus import CODE, LOREM


def varied_corpus() -> list[str]:
    rng = random.Random(7)
    pieces = [
        "hello",
        "Hello",
        " world",
        "ünïcödé",
        "日本語のテキスト",
        "Ελληνικά",
        "emoji 🤖🚀👍🏽",
        "\t",
        "\n",
        "\r\n",
        " " * 17,
        "1234567",
        "3.14",
        "'s",
        "'re",
    ]
    randoms = ["".join(rng.choices(pieces, k=rng.randint(1, 30))) for _ in range(50)]
    return [
        "",
        "What is 1+1?",
        CODE,
        LOREM * 5,
        "x" + " " * 300 + "y",
        "\n\n\n    \n\t\t  trailing   ",
        "0123456789" * 20,
        "mixed 中文 and English, with numbers 42 and 1e-5.",
        "".join(chr(c) for c in range(0x20, 0x250)),
        *randoms,
    ]


@pytest.mark.parametrize("text", varied_corpus())
def test_ids_equal_llama_models(tokenizer, text):
    reference = LlamaTokenizer.get_instance()
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, bos=False, eos=False)


def test_special_tokens_at_their_real_ids(tokenizer):
    reference = LlamaTokenizer.get_instance()
    assert len(reference.special_tokens) == 256
    for token, token_id in reference.special_tokens.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert tokenizer.convert_tokens_to_ids("<|begin_of_text|>") == 128000
    assert tokenizer.convert_tokens_to_ids("<|start_header_id|>") == 128006
    assert tokenizer.convert_tokens_to_ids("<|end_header_id|>") == 128007
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == 128009
    assert len(tokenizer) == 128256


def test_chat_template_is_llama31(tokenizer):
    messages = [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "1+1=2"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 1+1?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n1+1=2<|eot_id|>"
    )
