"""The engine model's scoring thread: Triton's `execute` reads a batch's requests, hands them here and
returns, and this thread scores them (scoring.answers) and answers each request through `send`.

Why a thread: while `execute` runs, Triton sends the instance nothing else, so with scoring inside it the
device idled between steps while Triton handed over the next batch, its requests were read and the last
step's answers went out: on one H200 (8B shape, the short mix through the server, steps replayed from CUDA
graphs) the engine was busy 85 % of the time, each step itself as fast per token as the engine in-process.
A python-backend model that answers through response senders may return from `execute` before it answers
(seen with tritonserver 2.51: the next batch's `execute` ran while the last batch's answers were pending),
so here the next batch is read while a step runs, and batches that arrive during a step are scored
together in the next one. At most `pending` batches wait: beyond them `execute` blocks, and Triton's own
queue holds the rest.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from reward_server.batching import StepResult
from reward_server.errors import EngineError
from reward_server.runtimes import RewardEngine
from reward_server.scoring import Answer, Rows, answers


class ScoringLoop:
    """Scores submitted batches on its own thread. `send(handle, answer)` is called once per submitted
    request, from that thread, with its Answer (`answer.request` indexes the merged batch it was scored in;
    use the handle). A failure outside the engine's steps (which fail only their own requests) fails the
    requests of that merged batch not yet answered, and the loop goes on with the next."""

    def __init__(
        self,
        engine: RewardEngine,
        send: Callable[[Any, Answer], None],
        on_step: Callable[[StepResult, list[int]], None] = lambda result, lengths: None,
        pending: int = 2,
    ) -> None:
        self.engine, self.send, self.on_step = engine, send, on_step
        self._batches: queue.Queue = queue.Queue(maxsize=pending)
        self._thread = threading.Thread(target=self._run, name="reward-scoring", daemon=True)
        self._thread.start()

    def submit(self, handles: Sequence[Any], batch: Sequence[Rows]) -> None:
        """Score `batch` (one Rows per request) and answer each request's handle; blocks while `pending`
        batches wait. An empty batch is nothing to do."""
        if handles:
            self._batches.put((list(handles), list(batch)))

    def close(self) -> None:
        """Score what was submitted, then end the thread."""
        self._batches.put(None)
        self._thread.join()

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._batches.get()
            if first is None:
                return
            handles, batch = first
            while True:  # everything that queued during the last step goes into this one
                try:
                    more = self._batches.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                handles += more[0]
                batch += more[1]
            self._score(handles, batch)

    def _score(self, handles: list[Any], batch: list[Rows]) -> None:
        answered: set[int] = set()
        try:
            for answer in answers(self.engine, batch, self.on_step):
                answered.add(answer.request)
                self._send(handles[answer.request], answer)
        except Exception as exc:  # the thread must outlive any batch: nothing submitted is left unanswered
            error = EngineError(f"reward engine failed: {type(exc).__name__}")
            error.__cause__ = exc
            for r in range(len(handles)):
                if r not in answered:
                    self._send(handles[r], Answer(r, None, error))

    def _send(self, handle: Any, answer: Answer) -> None:
        try:
            self.send(handle, answer)
        except Exception as exc:  # one answer that cannot be sent (its caller gone) must not cost the others theirs
            print(f"reward engine: an answer could not be sent: {exc!r}", file=sys.stderr, flush=True)
