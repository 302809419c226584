"""The engine model's scoring thread: Triton's `execute` reads a batch's requests, hands them here and
returns, and this thread scores them (scoring.answers) and answers each request through `send`.

Why a thread: while `execute` runs, Triton sends the instance nothing else, so with scoring inside it the
device idled between steps while Triton handed over the next batch, its requests were read and the last
step's answers went out: on one H200 (8B shape, the short mix through the server, steps replayed from CUDA
graphs) the engine was busy 85 % of the time, each step itself as fast per token as the engine in-process.
A python-backend model that answers through response senders may return from `execute` before it answers
(seen with tritonserver 2.51: the next batch's `execute` ran while the last batch's answers were pending),
so here the next batch is read while a step runs, and batches that arrive during a step are scored
together in the next one. At most `most_waiting` requests wait (reward_engine's max_batch_size): beyond
them `execute` blocks, and Triton's own queue holds the rest (a bound counted in batches made steps small:
`execute` returns at once, so Triton hands over the few requests that came since).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from reward_server.batching import StepResult
from reward_server.runtimes import RewardEngine
from reward_server.scoring import Answer, Rows, answers


class ScoringLoop:
    """Scores submitted batches on its own thread. `send(handle, answer)` is called once per submitted
    request, from that thread, with its Answer (`answer.request` indexes the merged batch it was scored in;
    use the handle). A failure outside the engine's steps (which fail only their own requests) fails the
    requests of that merged batch not yet answered, and the loop goes on with the next. `submit` blocks
    while `most_waiting` requests wait for a step (Triton's own queue then holds the rest)."""

    def __init__(
        self,
        engine: RewardEngine,
        send: Callable[[Any, Answer], None],
        on_step: Callable[[StepResult, list[int]], None] = lambda result, lengths: None,
        most_waiting: int = 64,
    ) -> None:
        self.engine, self.send, self.on_step, self.most_waiting = engine, send, on_step, most_waiting
        self._changed = threading.Condition()
        self._waiting: list[tuple[list[Any], list[Rows]]] = []  # batches submitted, not yet taken by a step
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="reward-scoring", daemon=True)
        self._thread.start()

    def submit(self, handles: Sequence[Any], batch: Sequence[Rows]) -> None:
        """Score `batch` (one Rows per request) and answer each request's handle."""
        if not handles:
            return
        with self._changed:
            self._changed.wait_for(lambda: sum(len(waiting) for waiting, _ in self._waiting) < self.most_waiting)
            self._waiting.append((list(handles), list(batch)))
            self._changed.notify_all()

    def close(self) -> None:
        """Score what was submitted, then end the thread."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:  # everything submitted during the last step goes into this one
                self._changed.wait_for(lambda: self._waiting or self._closing)
                if not self._waiting:
                    return
                taken, self._waiting = self._waiting, []
                self._changed.notify_all()
            self._score([h for handles, _ in taken for h in handles], [rows for _, batch in taken for rows in batch])

    def _score(self, handles: list[Any], batch: list[Rows]) -> None:
        for answer in answers(self.engine, batch, self.on_step):  # the thread outlives any batch's failure
            self._send(handles[answer.request], answer)

    def _send(self, handle: Any, answer: Answer) -> None:
        try:
            self.send(handle, answer)
        except Exception as exc:  # one answer that cannot be sent (its caller gone) must not cost the others theirs
            print(f"reward engine: an answer could not be sent: {exc!r}", file=sys.stderr, flush=True)
