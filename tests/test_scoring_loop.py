"""The engine model's scoring thread (scoring_loop.py), with a real engine on the demo checkpoint: batches
that arrive during a step are scored together in the next with the bits of scoring them apart, every
submitted request gets one answer whatever fails, and a full queue holds `execute` back. The steps are
held open with events, not timed: each assertion follows from the order the test imposes."""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest

from reward_client import protocol
from reward_server.runtimes.torch_runtime import TorchRewardEngine
from reward_server.scoring import Rows
from reward_server.scoring_loop import ScoringLoop


class HeldEngine:
    """The engine, each of whose steps waits until `release` is set; `entered` is set when the first one starts."""

    def __init__(self, engine: TorchRewardEngine) -> None:
        self.engine, self.entered, self.release = engine, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def score_step(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(60), "the test never released the step"
        return self.engine.score_step(*args, **kwargs)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return TorchRewardEngine(str(checkpoint), device="cpu")


def rows(*sequences: np.ndarray) -> list[Rows]:
    return [Rows([s], [np.array([len(s) - 1])]) for s in sequences]


def collect(answers: queue.Queue, count: int) -> dict:
    return dict(answers.get(timeout=60) for _ in range(count))


def test_batches_that_arrive_during_a_step_are_scored_together_in_the_next(engine, token_ids):
    held, answers, steps = HeldEngine(engine), queue.Queue(), []
    loop = ScoringLoop(held, lambda handle, answer: answers.put((handle, answer)), lambda result, lengths: steps.append(len(lengths)))
    loop.submit(["a"], rows(token_ids[0]))
    assert held.entered.wait(60)  # the first batch's step runs
    loop.submit(["b", "c"], rows(token_ids[1], token_ids[2]))
    loop.submit(["d"], rows(token_ids[3]))
    held.release.set()
    got = collect(answers, 4)
    loop.close()
    assert steps == [1, 3]  # b, c and d queued during a's step: one step, not two
    expected = engine.score(token_ids[:4])
    for i, handle in enumerate("abcd"):
        assert got[handle].error is None
        assert np.array_equal(got[handle].outputs[protocol.ATTRIBUTES][0], expected[i])  # the bits of scoring apart


def test_a_failure_outside_the_steps_fails_its_requests_and_the_loop_goes_on(engine, token_ids, monkeypatch):
    answers = queue.Queue()
    loop = ScoringLoop(engine, lambda handle, answer: answers.put((handle, answer)))

    def broken(*args):
        raise RuntimeError("broken")

    with monkeypatch.context() as patch:
        patch.setattr(engine, "read_positions", broken)
        loop.submit(["x", "y"], rows(token_ids[0], token_ids[1]))
        failed = collect(answers, 2)
    assert {handle: str(answer.error) for handle, answer in failed.items()} == dict.fromkeys("xy", "reward engine failed: RuntimeError")
    assert all(isinstance(answer.error.__cause__, RuntimeError) and answer.outputs is None for answer in failed.values())
    loop.submit(["z"], rows(token_ids[2]))
    assert np.array_equal(collect(answers, 1)["z"].outputs[protocol.ATTRIBUTES][0], engine.score(token_ids[2:3])[0])
    loop.close()


def test_an_answer_that_cannot_be_sent_costs_no_other_its_answer(engine, token_ids, capfd):
    answers = queue.Queue()

    def send(handle, answer):
        if handle == "gone":
            raise RuntimeError("the caller went away")
        answers.put((handle, answer))

    loop = ScoringLoop(engine, send)
    loop.submit(["first", "gone", "last"], rows(*token_ids[:3]))
    got = collect(answers, 2)
    loop.close()
    assert sorted(got) == ["first", "last"] and all(answer.error is None for answer in got.values())
    assert "an answer could not be sent: RuntimeError('the caller went away')" in capfd.readouterr().err


def test_a_full_queue_holds_execute_back_until_a_step_ends(engine, token_ids):
    held, answers = HeldEngine(engine), queue.Queue()
    loop = ScoringLoop(held, lambda handle, answer: answers.put((handle, answer)), most_waiting=2)
    loop.submit([0], rows(token_ids[0]))
    assert held.entered.wait(60)
    loop.submit([1], rows(token_ids[1]))
    loop.submit([2], rows(token_ids[2]))  # two requests wait: the most there may be
    third = threading.Thread(target=loop.submit, args=([3], rows(token_ids[3])))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # blocked while the step runs
    held.release.set()
    third.join(60)
    assert not third.is_alive() and sorted(collect(answers, 4)) == [0, 1, 2, 3]
    loop.close()


def test_close_answers_everything_submitted_first(engine, token_ids):
    answers = queue.Queue()
    loop = ScoringLoop(engine, lambda handle, answer: answers.put((handle, answer)))
    for i in range(3):
        loop.submit([i], rows(token_ids[i]))
    loop.close()
    assert answers.qsize() == 3
    assert sorted(collect(answers, 3)) == [0, 1, 2]  # all three in before close returned
