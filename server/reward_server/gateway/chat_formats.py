"""Text in a policy's chat template (special tokens written out) parsed back into messages.

OpenRLHF sends prompt + response as the policy rendered them; the reward model has its own
template. Each format is recognised by its published markers; the one whose marker comes first in
the text is used (a marker quoted inside a message comes after the template's first one). A text
must be whole turns of that format from start to end (a final assistant turn cut off before its end
token is accepted: generation may stop at max tokens); anything else is an UnknownFormat error.

- llama3:  <|begin_of_text|><|start_header_id|>ROLE<|end_header_id|>\\n\\nTEXT<|eot_id|>...   (<|eom_id|>
           also ends a turn; an `ipython` turn is read as one, and refused by the conversation's roles)
           (Llama 3.1's default "Cutting Knowledge Date/Today Date" system preamble is dropped:
           the reward model's template writes its own)
- chatml:  <|im_start|>ROLE\\nTEXT<|im_end|>\\n...   (Qwen, ChatML)
- gemma:   <bos><start_of_turn>user|model\\nTEXT<end_of_turn>\\n...   (a system prompt is already
           merged into the first user turn by Gemma's template)
- mistral: <s>[SYSTEM_PROMPT]S[/SYSTEM_PROMPT][INST] U [/INST] A</s>...   (v1 spaces or v3+ none)
- steerlm: <extra_id_0>System\\nS\\n<extra_id_1>User\\nU\\n<extra_id_1>Assistant\\nA\\n<extra_id_2>
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reward_client.conversation import Message


class UnknownFormat(ValueError):
    """The text is in no chat format this module knows, or not wholly in the one it starts with."""


@dataclass(frozen=True)
class Format:
    name: str
    marker: str  # its first special text; tells the formats apart
    start: re.Pattern  # what may come before the first turn (BOS)
    turn: re.Pattern  # one turn: groups role, content
    end: re.Pattern  # what may follow the last turn (EOS, padding)
    roles: dict[str, str]


def _format(name: str, marker: str, start: str, turn: str, end: str, roles: dict[str, str]) -> Format:
    return Format(name, marker, re.compile(start), re.compile(turn, re.DOTALL), re.compile(end, re.DOTALL), roles)


FORMATS = (
    _format(
        "llama3",
        "<|start_header_id|>",
        r"(<\|begin_of_text\|>)?",
        r"<\|start_header_id\|>(system|user|assistant|ipython)<\|end_header_id\|>\n\n(.*?)"
        r"(?:<\|eot_id\|>|<\|eom_id\|>|(?=<\|end_of_text\|>)|\Z)",
        r"(<\|eot_id\|>|<\|end_of_text\|>|<\|finetune_right_pad_id\|>|\s)*\Z",  # a policy may pad with its EOS
        {"system": "system", "user": "user", "assistant": "assistant", "ipython": "ipython"},
    ),
    _format(
        "chatml",
        "<|im_start|>",
        r"",
        r"<\|im_start\|>(system|user|assistant)\n(.*?)(?:<\|im_end\|>\n?|(?=<\|endoftext\|>)|\Z)",
        r"(<\|im_end\|>|<\|endoftext\|>|\s)*\Z",
        {"system": "system", "user": "user", "assistant": "assistant"},
    ),
    _format(
        "gemma",
        "<start_of_turn>",
        r"(<bos>)?",
        r"<start_of_turn>(user|model)\n(.*?)(?:<end_of_turn>\n?|(?=<eos>)|\Z)",
        r"(<eos>|<pad>|\s)*\Z",
        {"user": "user", "model": "assistant"},
    ),
    _format(
        "steerlm",
        "<extra_id_0>System\n",
        r"",
        r"<extra_id_(?:0|1)>(System|User|Assistant)\n(.*?)\n?(?=<extra_id_1>|<extra_id_2>|\Z)",
        r"(<extra_id_2>.*)?\Z",  # <extra_id_2> ends the scored turn (attribute labels may follow)
        {"System": "system", "User": "user", "Assistant": "assistant"},
    ),
)
MISTRAL_MARKERS = ("[INST]", "[SYSTEM_PROMPT]")


def parse(text: str) -> tuple[str, list[Message]]:
    """(format name, messages) of a templated text; UnknownFormat says what did not fit."""
    found = [(text.find(f.marker), f.name) for f in FORMATS if f.marker in text]
    found += [(text.find(m), "mistral") for m in MISTRAL_MARKERS if m in text]
    if not found:
        markers = ", ".join([*(f.marker.strip() for f in FORMATS), *MISTRAL_MARKERS])
        raise UnknownFormat(f"in no known chat format (Llama 3, ChatML/Qwen, Gemma, Mistral, SteerLM: none of {markers})")
    name = min(found)[1]
    messages = _mistral(text) if name == "mistral" else _turns(next(f for f in FORMATS if f.name == name), text)
    if name == "llama3" and messages and messages[0]["role"] == "system":
        messages[0] = Message(role="system", content=LLAMA31_PREAMBLE.sub("", messages[0]["content"], count=1))
        if not messages[0]["content"]:
            messages = messages[1:]
    return name, messages


# Llama 3.1's template writes this at the start of every system turn.
LLAMA31_PREAMBLE = re.compile(r"\A(Environment: ipython\n)?Cutting Knowledge Date: [^\n]*\nToday Date: [^\n]*\n\n")


def _turns(spec: Format, text: str) -> list[Message]:
    position = spec.start.match(text).end()
    messages = []
    while match := spec.turn.match(text, position):
        if match.end() == position:  # an empty match at the end: nothing more to read
            break
        messages.append(Message(role=spec.roles[match[1]], content=match[2]))
        position = match.end()
    if not spec.end.match(text, position):
        raise UnknownFormat(f"{spec.name} chat format: text at character {position} is not a {spec.name} turn: {text[position:][:40]!r}")
    return messages


_MISTRAL = re.compile(r"(\[SYSTEM_PROMPT\](.*?)\[/SYSTEM_PROMPT\])|(\[INST\](.*?)\[/INST\](.*?)(?:</s>|(?=\[INST\])|\Z))", re.DOTALL)


def _mistral(text: str) -> list[Message]:
    position = len("<s>") if text.startswith("<s>") else 0
    messages = []
    while position < len(text) and (match := _MISTRAL.match(text, position)):
        if match[1]:
            messages.append(Message(role="system", content=match[2].strip()))
        else:
            messages.append(Message(role="user", content=match[4].strip()))
            messages.append(Message(role="assistant", content=match[5].strip()))
        position = match.end()
    if not re.fullmatch(r"(</s>|\s)*", text[position:]):
        raise UnknownFormat(f"mistral chat format: text at character {position} is not a mistral turn: {text[position:][:40]!r}")
    return messages
