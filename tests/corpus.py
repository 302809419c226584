"""Varied conversations for parity tests, built deterministically."""

from __future__ import annotations

import random

LOREM = (
    "Reward models score the final assistant turn of a conversation. The score is read at the last token of "
    "the chat-templated conversation, after the end-of-turn marker. "
)

CODE = '''def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


if __name__ == "__main__":
    print([fibonacci(i) for i in range(10)])
'''


def conversations() -> list[list[dict[str, str]]]:
    """At least 20 conversations: multi-turn, system turns, unicode, code, whitespace, ~3,000 tokens."""
    rng = random.Random(1234)
    convs: list[list[dict[str, str]]] = [
        [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "1+1=2"}],
        [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "1+1=3"}],
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
        ],
        [
            {"role": "user", "content": "Write a Python Fibonacci function."},
            {"role": "assistant", "content": f"```python\n{CODE}```"},
        ],
        [
            {"role": "user", "content": "Übersetze: 'good morning' ins Japanische und Russische."},
            {"role": "assistant", "content": "おはようございます — Доброе утро 🌅"},
        ],
        [
            {"role": "user", "content": "مرحبا، كيف حالك؟"},
            {"role": "assistant", "content": "أنا بخير، شكراً! 😊 我很好。"},
        ],
        [
            {"role": "user", "content": "Indent this:\n\n\tfoo\n\t\tbar"},
            {"role": "assistant", "content": "    foo\n        bar\n\n\n      \n"},
        ],
        [{"role": "user", "content": "Digits?"}, {"role": "assistant", "content": "3.14159265358979 2718281828 1234567890"}],
        [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
            {"role": "assistant", "content": "Why did the gradient vanish? It had too many layers of sadness."},
        ],
        [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": "Give me a point."},
            {"role": "assistant", "content": '{"x": 1, "y": -2.5, "tags": ["a", "b"]}'},
            {"role": "user", "content": "Another."},
            {"role": "assistant", "content": '{"x": 0, "y": 0}'},
        ],
        [
            {"role": "user", "content": "SQL to count users?"},
            {"role": "assistant", "content": "SELECT COUNT(*) FROM users WHERE active = TRUE;"},
        ],
        [
            {"role": "user", "content": "Math: ∫₀¹ x² dx = ?"},
            {"role": "assistant", "content": "∫₀¹ x² dx = ⅓ ≈ 0.333…"},
        ],
        [{"role": "user", "content": "A" * 300}, {"role": "assistant", "content": "B" * 300}],
        [
            {"role": "system", "content": "   Leading and trailing spaces are trimmed by the template.   "},
            {"role": "user", "content": "  ok?  "},
            {"role": "assistant", "content": "  yes  "},
        ],
        [
            {"role": "user", "content": "Long story please."},
            {"role": "assistant", "content": LOREM * 90},  # ~3,000 tokens
        ],
    ]
    words = ["reward", "model", "triton", "token", "λ", "データ", "score", "batch", "🙂", "x=1;", "\n", "  "]
    for turns in (1, 2, 3, 4, 5, 1):
        conv: list[dict[str, str]] = []
        if rng.random() < 0.5:
            conv.append({"role": "system", "content": " ".join(rng.choices(words, k=rng.randint(3, 20)))})
        for _ in range(turns):
            conv.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 60)))})
            conv.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 120)))})
        convs.append(conv)
    return convs


def nemo_record() -> dict:
    """The NeMo-Aligner form of a two-turn conversation with a system prompt."""
    return {
        "system": "You are helpful.",
        "mask": "User",
        "conversations": [
            {"from": "User", "value": "What is the capital of France?"},
            {"from": "Assistant", "value": "Paris.", "label": None},
            {"from": "User", "value": "And of Italy?"},
            {"from": "Assistant", "value": "Rome.", "label": "helpfulness:4"},
        ],
    }
