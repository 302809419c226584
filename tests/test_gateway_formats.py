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


def test_a_policy_that_pads_with_its_eos_or_writes_past_the_end_is_read(tokenizer):
    """OpenRLHF pads a batch's queries with the policy's pad token, which is its EOS when it has none
    (Llama 3.1 Instruct's <|eot_id|>, Qwen's <|im_end|>, Mistral's </s>): any number of them after the last
    turn; SteerLM's labels, or a newline, after its <extra_id_2>."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert parse(prompt + "Hello!<|eot_id|><|eot_id|><|eot_id|>") == ("llama3", expected)
    assert parse(prompt + "Hello!<|eom_id|>") == ("llama3", expected)  # Llama 3.1's end of a tool-calling turn
    assert parse("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|><|im_end|><|im_end|>")[1] == expected
    assert parse("<s>[INST] Hi [/INST] Hello!</s></s></s>") == ("mistral", expected)
    steerlm = "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello!\n<extra_id_2>"
    for tail in ("\n", "quality:4,toxicity:0\n"):
        assert parse(steerlm + tail) == parse(steerlm)


def test_an_ipython_turn_is_read_as_one_and_refused_by_name(tokenizer):
    """A tool result (Llama 3.1's ipython role) is not swallowed into the assistant turn before it: the
    conversation's roles then refuse it by name (it was two assistant turns: a misleading order error)."""
    from reward_client import conversation
    from reward_client.errors import InvalidConversationError

    text = (
        "<|start_header_id|>user<|end_header_id|>\n\nWeather?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>get_weather()<|eom_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is sunny.<|eot_id|>"
    )
    name, messages = parse(text)
    assert name == "llama3" and [m["role"] for m in messages] == ["user", "assistant", "ipython", "assistant"]
    with pytest.raises(InvalidConversationError, match="ipython"):
        conversation.normalize(messages)
