"""Per-turn scoring from one render: each cut's text and end token, against rendering every cut on its
own (the oracle), on the shipped templates and on templates built to defeat the one-render reading."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings

from reward_server.errors import RequestError
from reward_server.templating import ChatTokenizer
from reward_server.turn_cuts import render_cuts
from tests.test_fuzz import DERANDOMIZE, EXAMPLES, valid  # its conversations: any text, template syntax, special tokens

LOOP = "{%- for m in messages -%}<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}<|eot_id|>{%- endfor -%}"
TEMPLATES = {
    # one-render readable: every assistant cut is told by the whole's render
    "plain loop": "{{- bos_token -}}" + LOOP,
    "loop variable": "{%- for m in messages -%}{{ loop.index0 }}:{{ m.role }}:{{ m.content }}<|eot_id|>{%- endfor -%}",
    "system slice": "{%- if messages[0].role == 'system' -%}S:{{ messages[0].content }}<|eot_id|>{%- set messages = messages[1:] -%}"
    "{%- endif -%}" + LOOP,
    "filtered loop": "{%- for m in messages if m.role != 'system' -%}{{ m.role }}:{{ m.content }}<|eot_id|>{%- endfor -%}",
    "text after the loop": LOOP + "<|end_of_text|>",  # cuts are told, and are not prefixes: refused
    # each defeats the reading; the cuts are then rendered one by one
    "last turn differs": "{%- for m in messages -%}{{ m.content }}{% if loop.last %}<|end_of_text|>{% else %}<|eot_id|>{% endif %}"
    "{%- endfor -%}",
    "length": "{{ messages | length }}" + LOOP,
    "from the end": LOOP + "{% if messages[-1].role == 'assistant' %}<|end_of_text|>{% endif %}",
    "namespace": "{%- set ns = namespace(n=0) -%}{%- for m in messages -%}{%- set ns.n = ns.n + 1 -%}{{ m.content }}<|eot_id|>"
    "{%- endfor -%}{{ ns.n }}",
    "buffered loop": "{%- filter upper -%}" + LOOP + "{%- endfilter -%}",
    "read ahead": "{%- for pair in messages | batch(2) -%}{% for m in pair %}{{ m.content }}<|eot_id|>{% endfor %}{%- endfor -%}"
    "{{ 'odd' }}",
    "macro": "{%- macro turn(m) -%}{{ m.role }}:{{ m.content }}<|eot_id|>{%- endmacro -%}{%- for m in messages -%}{{ turn(m) }}"
    "{%- endfor -%}",
    "for-else": "{%- for m in messages if m.role == 'nobody' -%}x{%- else -%}none{%- endfor -%}" + LOOP,
    "second loop": LOOP + "{%- for m in messages -%}.{%- endfor -%}",
    "filtered loop, last": "{%- for m in messages if m.role != 'x' -%}{% if loop.last %}<END>{% endif %}{{ m.content }}<|eot_id|>"
    "{%- endfor -%}",
    "filtered loop, length": "{%- for m in messages if m.role != 'x' -%}{{ m.content }}/{{ loop.length }}<|eot_id|>{%- endfor -%}",
    "cycler": "{%- set c = cycler('a', 'b', 'c') -%}{%- for m in messages -%}{{ m.content }}<|eot_id|>{%- set _ = c.next() -%}"
    "{%- endfor -%}{{ c.current }}",
    "joiner": "{%- set j = joiner('|') -%}{%- for m in messages -%}{% if loop.index0 == 2 %}{{ j() }}{% endif %}{{ m.content }}"
    "<|eot_id|>{%- endfor -%}{{ j() }}",
    "namespace, renamed": "{%- set N = namespace -%}{%- set ns = N(n=0) -%}{%- for m in messages -%}{%- set ns.n = ns.n + 1 -%}"
    "{{ m.content }}<|eot_id|>{%- endfor -%}{{ ns.n }}",
    "printed messages": "{{ messages }}" + LOOP,
}
READABLE = {"plain loop", "loop variable", "system slice", "filtered loop", "text after the loop", "macro"}


def conversation(rng: random.Random, system: bool) -> list[dict]:
    messages = [{"role": "system", "content": "be brief"}] if system else []
    for turn in range(rng.randint(1, 6)):
        messages += [{"role": "user", "content": f"question {turn} " * rng.randint(1, 3)}]
        messages += [{"role": "assistant", "content": f" answer {turn}\n" * rng.randint(1, 3)}]
    return messages


def oracle(chat: ChatTokenizer, messages: list) -> list[int] | None:
    """Each assistant cut rendered and tokenized on its own: the end token of each, or None when a cut
    is not a prefix of the whole (per-turn scores refused)."""
    whole = chat.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    ends = []
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            cut = chat.tokenizer.apply_chat_template(messages[: k + 1], tokenize=True, return_dict=False)
            if whole[: len(cut)] != cut:
                return None
            ends.append(len(cut) - 1)
    return ends


@pytest.fixture(scope="module")
def chat(checkpoint) -> ChatTokenizer:
    return ChatTokenizer(str(checkpoint), max_tokens=1 << 20)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_per_turn_positions_equal_rendering_every_cut(chat, name, monkeypatch):
    monkeypatch.setattr(chat.tokenizer, "chat_template", TEMPLATES[name])
    rng = random.Random(name)
    for case in range(12):
        messages = conversation(rng, system=case % 2 == 1)
        expected = oracle(chat, messages)
        cuts = render_cuts(chat.tokenizer, messages)
        assert cuts.text == chat.tokenizer.apply_chat_template(messages, tokenize=False)
        assistant_cuts = [k for k, m in enumerate(messages[:-1]) if m["role"] == "assistant"]
        for k in assistant_cuts:
            if cuts.cut(k) is not None:
                assert cuts.cut(k) == chat.tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        told = all(cuts.cut(k) is not None for k in assistant_cuts)
        assert told == (name in READABLE) or not assistant_cuts
        if expected is None:
            with pytest.raises(RequestError, match="prefix"):
                chat.encode(json.dumps(messages).encode(), all_turns=True)
        else:
            ids, positions = chat.encode(json.dumps(messages).encode(), all_turns=True)
            assert positions.tolist() == expected
            assert ids.tolist() == chat.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)


def test_an_assistant_turn_the_template_renders_nothing_of_is_refused_by_name(chat, monkeypatch):
    """Empty turns rendered as nothing end where the turn before them ends: one position for two scores (the engine
    refused it as tensors: "SCORE_AT must list ascending positions", a tensor the client never sent)."""
    skipping = "{{- bos_token -}}{%- for m in messages if m.content -%}" + LOOP.split("-%}", 1)[1]
    monkeypatch.setattr(chat.tokenizer, "chat_template", skipping)
    turns = ["q", "a1", "", "", "q2", "x"]
    messages = [{"role": ("user", "assistant")[k % 2], "content": text} for k, text in enumerate(turns)]
    with pytest.raises(RequestError, match=r"conversation\[3\]: ends where the assistant turn before it ends") as caught:
        chat.encode(json.dumps(messages).encode(), all_turns=True)
    assert caught.value.reason == "per_turn"
    turns[3] = "a2"
    messages = [{"role": ("user", "assistant")[k % 2], "content": text} for k, text in enumerate(turns)]
    assert chat.encode(json.dumps(messages).encode(), all_turns=True)[1].tolist() == oracle(chat, messages)


@pytest.mark.parametrize("template", ["demo", "steerlm"])
def test_shipped_templates_are_read_in_one_render(chat, steerlm, template):
    """The Llama 3.1 and SteerLM templates: every cut told by the one render (SteerLM's then refused:
    its text after the loop, <extra_id_2>, makes no cut a prefix)."""
    tokenizer = chat.tokenizer if template == "demo" else ChatTokenizer(str(steerlm), max_tokens=1 << 20).tokenizer
    messages = conversation(random.Random(1), system=True) + conversation(random.Random(2), system=False)
    cuts = render_cuts(tokenizer, messages)
    for k, message in enumerate(messages[:-1]):
        if message["role"] == "assistant":
            assert cuts.cut(k) == tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)


def test_one_render_and_one_tokenization_per_request(chat, monkeypatch):
    """127 assistant turns on the shipped template: the template runs once and the tokenizer once,
    whatever the number of turns (linear)."""
    messages = [{"role": "system", "content": "be brief"}]
    for turn in range(127):
        messages += [{"role": "user", "content": f"question {turn}"}, {"role": "assistant", "content": f"answer {turn}"}]
    calls = {"render": 0, "tokenize": 0}
    tokenizer_class = type(chat.tokenizer)

    def counted(name, method):
        def call(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)

        return call

    monkeypatch.setattr(tokenizer_class, "apply_chat_template", counted("render", tokenizer_class.apply_chat_template))
    monkeypatch.setattr(tokenizer_class, "__call__", counted("tokenize", tokenizer_class.__call__))
    positions = chat.encode(json.dumps(messages).encode(), all_turns=True)[1]
    assert calls == {"render": 0, "tokenize": 1}  # the one render is render_cuts' own
    assert len(positions) == 127
    assert positions.tolist() == oracle(chat, messages)


@settings(max_examples=EXAMPLES, derandomize=DERANDOMIZE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=valid)
def test_fuzzed_conversations_per_turn_equal_rendering_every_cut(chat, messages):
    """`make fuzz` runs it 10,000 times (FUZZ_EXAMPLES): content with turn-end tokens, template syntax,
    NULs and any Unicode; the one-render positions equal each cut rendered and tokenized alone."""
    expected = oracle(chat, messages)
    if expected is None:
        with pytest.raises(RequestError, match="prefix"):
            chat.encode(json.dumps(messages).encode(), all_turns=True)
    else:
        assert chat.encode(json.dumps(messages).encode(), all_turns=True)[1].tolist() == expected


def test_a_request_of_many_rows_is_tokenized_in_one_call(chat, checkpoint, monkeypatch):
    """Conversations (read at their last token) and texts of one request: one tokenizer call for all its
    rows (a fast tokenizer spreads a batch over the cores), each row's ids those of encoding it alone."""
    import numpy as np

    from reward_client import protocol
    from reward_server.inputs import Inputs

    rng = random.Random(5)
    words = ["short", "words", "ünï", "🤖", "\n"]
    conversations = [
        [{"role": "user", "content": " ".join(rng.choices(words, k=n))}, {"role": "assistant", "content": "ok"}] for n in (1, 40, 400, 7)
    ]
    alone = [chat.tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in conversations]
    texts = [chat.render(c) for c in conversations]
    column = lambda values: np.array([[v] for v in values], dtype=object)  # noqa: E731
    inputs = Inputs(chat)
    calls = []
    tokenizer_class = type(chat.tokenizer)
    call = tokenizer_class.__call__
    monkeypatch.setattr(tokenizer_class, "__call__", lambda self, *a, **k: calls.append(a) or call(self, *a, **k))
    rows = inputs.encode({protocol.CONVERSATION: column(json.dumps(c).encode() for c in conversations)})
    assert len(calls) == 1 and [ids.tolist() for ids, _ in rows] == alone
    assert [reads.tolist() for _, reads in rows] == [[len(ids) - 1] for ids in alone]
    calls.clear()
    rows = inputs.encode({protocol.TEXT: column(t.encode() for t in texts), protocol.ADD_SPECIAL_TOKENS: np.zeros((4, 1), bool)})
    assert len(calls) == 1 and [ids.tolist() for ids, _ in rows] == [chat.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    limited = Inputs(ChatTokenizer(str(checkpoint), max_tokens=4096, max_turns=8))
    with pytest.raises(RequestError, match="row 2: conversation: 10 turns is over the limit of 8"):
        limited.encode({protocol.CONVERSATION: column(json.dumps(c).encode() for c in [*conversations[:2], conversations[0] * 5])})


def test_the_requests_of_a_batch_are_tokenized_in_one_call_and_fail_alone(chat, monkeypatch):
    """Preprocessing's batch of requests (RLHF: one response a request): the texts of all of them in one
    tokenizer call, each request's rows those it gets alone; a bad request gets its own error in its place,
    and the requests beside it their rows (per-turn and cut rows are tokenized on their own, as alone)."""
    import numpy as np

    from reward_client import protocol
    from reward_server.inputs import Inputs

    inputs = Inputs(chat)
    conversation = lambda n: [{"role": "user", "content": "hi " * n}, {"role": "assistant", "content": "ok " * n}]  # noqa: E731
    column = lambda values: np.array([[v] for v in values], dtype=object)  # noqa: E731
    requests = [
        {protocol.CONVERSATION: column([json.dumps(conversation(3)).encode(), json.dumps(conversation(40)).encode()])},
        {protocol.CONVERSATION: column([b"[{]"])},  # not JSON
        {protocol.TEXT: column([b"plain text"])},
        {protocol.CONVERSATION: column([json.dumps(conversation(5) * 2).encode()]), protocol.SCORE_TURNS: np.ones((1, 1), bool)},
        {protocol.TOKENS: np.array([[5, 6, 7]], np.int32), protocol.TEXT: column([b"both"])},  # two sources
        {protocol.CONVERSATION: column([json.dumps(conversation(7)).encode()])},
    ]
    alone = [inputs.encode_requests([r])[0] for r in requests]
    calls = []
    tokenizer_class = type(chat.tokenizer)
    call = tokenizer_class.__call__
    monkeypatch.setattr(tokenizer_class, "__call__", lambda self, *a, **k: calls.append(a) or call(self, *a, **k))
    together = inputs.encode_requests(requests)
    batched = [a for a in calls if isinstance(a[0], list)]
    assert len(batched) == 1 and len(batched[0][0]) == 4  # 2 + 1 + 1 rows that are one text each
    for got, expected in zip(together, alone, strict=True):
        if isinstance(expected, Exception):
            assert type(got) is type(expected) and str(got) == str(expected)
        else:
            assert [(ids.tolist(), reads.tolist()) for ids, reads in got] == [(ids.tolist(), reads.tolist()) for ids, reads in expected]
    assert isinstance(together[1], RequestError) and isinstance(together[4], RequestError) and "exactly one of" in str(together[4])
    assert len(together[3][0][1]) == 2  # the per-turn request: both assistant turns read
