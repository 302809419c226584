"""Chat-format parsing for /get_reward: texts rendered by real chat templates parse back into their messages.

Llama 3.1's template is the demo checkpoint's and SteerLM's is build/steerlm_chat_template.jinja (the
project's checkpoints carry them). No project checkpoint carries a ChatML, Gemma or Mistral template:
those are written below as the canonical renderings of their published formats (Qwen2.5's ChatML with
its default system prompt, Gemma 2's turns with the system prompt merged into the first user turn,
Mistral's v1 `[INST] ... [/INST]` and v7 `[SYSTEM_PROMPT]`)."""

from __future__ import annotations

import jinja2
import pytest

from reward_server.gateway.chat_formats import UnknownFormat, parse
from tests.corpus import conversations

CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
GEMMA = (
    "<bos>{% set first = true %}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ (system if loop.first else '') + m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}"
)
MISTRAL_V1 = (
    "<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
)
MISTRAL_V7 = (
    "<s>{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'] }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)


def render(template: str, messages) -> str:
    return jinja2.Environment().from_string(template).render(messages=messages)


def stripped(messages):
    """Mistral's and Gemma's templates trim the text of each turn."""
    return [{**m, "content": m["content"].strip()} for m in messages]


CASES = [c for c in conversations() if c[-1]["content"].strip() and all(m["content"].strip() for m in c)][:12]


@pytest.fixture(scope="module")
def steerlm_tokenizer(steerlm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(steerlm)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_llama31_and_steerlm_texts_parse_back_to_their_messages(index, tokenizer, steerlm_tokenizer):
    """Parsed messages render to the very same text: Llama 3.1's template trims each turn and writes
    its date preamble into the system turn, which the parser drops (the template writes it again)."""
    messages = CASES[index]
    for template, expected in ((tokenizer, "llama3"), (steerlm_tokenizer, "steerlm")):
        text = template.apply_chat_template(messages, tokenize=False)
        name, parsed = parse(text)
        assert name == expected and template.apply_chat_template(parsed, tokenize=False) == text
        turns = [m["role"] for m in messages if m["role"] != "system"]
        assert [m["role"] for m in parsed if m["role"] != "system"] == turns  # SteerLM's default system prompt is explicit


@pytest.mark.parametrize("index", range(len(CASES)))
def test_chatml_gemma_and_mistral_texts_parse_back_to_their_messages(index):
    messages = CASES[index]
    name, parsed = parse(render(CHATML, messages))
    assert name == "chatml" and parsed[-len(messages) :] == messages
    no_system = [m for m in messages if m["role"] != "system"]
    name, parsed = parse(render(GEMMA, no_system))
    assert name == "gemma" and parsed == stripped(no_system)
    name, parsed = parse(render(MISTRAL_V1, no_system))
    assert name == "mistral" and parsed == stripped(no_system)
    name, parsed = parse(render(MISTRAL_V7, messages))
    assert name == "mistral" and parsed == stripped(messages)


def test_openrlhf_queries_end_with_the_generated_eos_or_are_cut_off(tokenizer):
    """OpenRLHF's query: the policy's prompt with its generation prompt + the raw generation, decoded
    with special tokens kept (the EOS it generated, or none when it stopped at max tokens)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    for tail in ("<|eot_id|>", "", "<|eot_id|><|end_of_text|><|end_of_text|>"):
        assert parse(prompt + "Hello!" + tail) == ("llama3", expected)
    assert parse("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|><|endoftext|>")[1] == expected


def test_a_marker_quoted_in_a_message_does_not_change_the_format():
    text = "<|im_start|>user\nWhat is [INST]?<|im_end|>\n<|im_start|>assistant\nMistral's <start_of_turn>-like marker.<|im_end|>\n"
    assert parse(text) == (
        "chatml",
        [{"role": "user", "content": "What is [INST]?"}, {"role": "assistant", "content": "Mistral's <start_of_turn>-like marker."}],
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("User: Hi\nAssistant: Hello!", "in no known chat format"),
        ("<|im_start|>user\nHi<|im_end|>\ngarbage<|im_start|>assistant\nHello<|im_end|>", "character 30 is not a chatml turn"),
        ("<|start_header_id|>robot<|end_header_id|>\n\nHi<|eot_id|>", "character 0 is not a llama3 turn"),
    ],
)
def test_text_in_no_known_format_is_named(text, problem):
    with pytest.raises(UnknownFormat, match=problem):
        parse(text)
