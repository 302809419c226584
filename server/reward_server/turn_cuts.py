"""Per-turn scores: the text of every cut conversation (the whole one cut after a turn) from one render
of the whole conversation.

A chat template is a program over `messages`. The whole conversation is rendered once through a view
of its messages that records every look at them, and how much text the template had produced at each.
Until the template first looks past message k it runs exactly as it would on the cut after k, so the
text produced by then is how the cut's render begins. When that first look was the messages loop
asking for its next item (after at least one), the cut's loop runs out right there, and the cut's
render goes on as the whole's does once its loop ran out: the same code from the same state, since
nothing but a `namespace()` carries state out of a Jinja loop. So the cut renders as that beginning
plus the whole's text after its loop. Each condition is checked on each render; where one fails (the
template asked for the length of the messages, indexed from the end, looked ahead with `loop.last`,
read messages after its loop, produced nothing during the loop, or uses a namespace, cycler, joiner or
for-else),
that cut is rendered on its own: always exact, only slower."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from jinja2 import nodes
from jinja2.runtime import LoopContext
from transformers.utils.chat_template_utils import _compile_jinja_template  # the template apply_chat_template renders

_LOOP_NEXT = LoopContext.__next__.__code__  # a `for` that uses `loop` takes its next item here


def _asked_by_a_loop(frame) -> bool:
    """Whether the frame asking for the next message is a template's `for` (not `loop.last` looking
    ahead, nor a filter such as `batch` reading ahead)."""
    if frame.f_code.co_filename == "<template>" and frame.f_code.co_varnames[:1] == ("fiter",):
        frame = frame.f_back  # a loop's own `if` filter: what matters is who asked it
    return frame.f_code is _LOOP_NEXT or frame.f_code.co_filename == "<template>"


@dataclass
class _Looks:
    """How far into the messages the template has looked while rendering, and what it had produced."""

    count: int
    produced: int = 0  # characters rendered so far
    horizon: int = -1  # the furthest message looked at
    past: dict[int, tuple[int, int | None]] = field(default_factory=dict)  # k -> (produced, loop) at the first look past k
    loops: int = 0  # iterations over the messages begun
    loop_starts: dict[int, int] = field(default_factory=dict)  # loop -> produced at its first item
    loop_end: tuple[int, int] | None = None  # (loop, produced) when a loop ran out of messages
    late: bool = False  # a look at the messages after a loop ran out

    def look(self, index: int, loop: int | None = None) -> None:
        """`index` looked at (`count`: all of them), by `loop` asking for its next item or (None) otherwise."""
        self.late |= self.loop_end is not None
        for k in range(max(self.horizon, 0), min(index, self.count)):
            self.past[k] = (self.produced, loop)
        self.horizon = max(self.horizon, index)


class _Messages(Sequence):
    """The messages from `start` on, every look at them recorded (a slice `messages[i:]` is a view too).
    Attributes start with `_`: the sandbox hides them from the template."""

    def __init__(self, messages: list, looks: _Looks, start: int = 0) -> None:
        self._messages, self._looks, self._start = messages, looks, start

    def __repr__(self) -> str:  # printed (`{{ messages }}`): as the list
        self._looks.look(self._looks.count)
        return repr(self._messages[self._start :])

    def __eq__(self, other) -> bool:
        self._looks.look(self._looks.count)
        return self._messages[self._start :] == other

    __hash__ = None

    def __len__(self) -> int:
        self._looks.look(self._looks.count)  # the length says what lies past every message
        return len(self._messages) - self._start

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1) and key.stop is None and (key.start or 0) >= 0:
            return _Messages(self._messages, self._looks, self._start + (key.start or 0))
        if isinstance(key, slice) or key < 0:  # needs the length
            self._looks.look(self._looks.count)
            return self._messages[self._start :][key]
        self._looks.look(self._start + key)
        return self._messages[self._start + key]

    def __iter__(self) -> Iterator:
        looks = self._looks
        looks.loops += 1
        loop, index = looks.loops, self._start
        while True:
            looks.look(index, loop if index > self._start and _asked_by_a_loop(sys._getframe(1)) else None)
            if index >= len(self._messages):
                if looks.loop_end is None and index > self._start:
                    looks.loop_end = (loop, looks.produced)
                return
            if index == self._start:
                looks.loop_starts[loop] = looks.produced
            yield self._messages[index]
            index += 1


STATEFUL_GLOBALS = {"namespace", "cycler", "joiner"}  # Jinja's objects that keep state across a loop's end


@lru_cache(maxsize=8)
def _carries_state(template: str) -> bool:
    """Whether a template can carry state out of a loop (a namespace, cycler or joiner, under any name)
    or render a loop's `else`."""
    tree = _compile_jinja_template(template).environment.parse(template)
    return (
        any(node.else_ for node in tree.find_all(nodes.For))
        or any(name.name in STATEFUL_GLOBALS for name in tree.find_all(nodes.Name))
        or any(True for _ in tree.find_all(nodes.NSRef))
    )


@dataclass(frozen=True)
class Cuts:
    """The whole conversation's text, and each cut's text where one render of the whole tells it."""

    text: str
    known: dict[int, str]  # message index k -> the text of the conversation cut after message k

    def cut(self, k: int) -> str | None:
        return self.known.get(k)


def render_cuts(tokenizer, messages: list) -> Cuts:
    """Render `messages` (dicts of string `role` and `content`, as the conversation schema gives: what
    apply_chat_template's own normalisation leaves unchanged) with the tokenizer's chat template as
    apply_chat_template does (no generation prompt); the template's errors propagate."""
    template = tokenizer.get_chat_template()
    looks = _Looks(len(messages))
    pieces = []
    kwargs = {**tokenizer.special_tokens_map, "tools": None, "documents": None, "add_generation_prompt": False}
    for piece in _compile_jinja_template(template).generate(messages=_Messages(messages, looks), **kwargs):
        pieces.append(piece)
        looks.produced += len(piece)
    text = "".join(pieces)
    if looks.loop_end is None or looks.late or _carries_state(template):
        return Cuts(text, {})
    loop, end = looks.loop_end
    if end <= looks.loop_starts[loop]:  # the loop produced nothing itself: it ran inside a buffered block
        return Cuts(text, {})
    after_loop = text[end:]
    return Cuts(text, {k: text[:produced] + after_loop for k, (produced, by) in looks.past.items() if by == loop})
