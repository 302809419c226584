"""Token-budget step planning (no server)."""

from __future__ import annotations

import random

import pytest

from reward_server.batching import plan_steps, shared_prefixes


def test_every_index_once_and_budget_respected():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 5000) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(1, 8000)
        steps = plan_steps(lengths, budget)
        assert sorted(i for step in steps for i in step) == list(range(len(lengths)))
        for step in steps:
            assert len(step) == 1 or sum(lengths[i] for i in step) <= budget


def test_short_sequences_go_first():
    assert plan_steps([3000, 100, 900, 50], 1000) == [[3, 1], [2], [0]]
    assert plan_steps([10, 10, 10], 30) == [[0, 1, 2]]


def test_steps_are_filled_before_the_next_opens():
    steps = plan_steps([100] * 10, 250)
    assert steps == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_oversized_sequence_runs_alone():
    assert plan_steps([50, 5], 10) == [[1], [0]]


def test_budget_must_be_positive():
    with pytest.raises(ValueError):
        plan_steps([1], 0)


def test_shared_prefixes_groups_best_of_n():
    prompt = list(range(100, 200))
    sequences = [[*prompt, 1, 2], [7] * 50, [*prompt, 3], [*prompt, 1, 2, 3], prompt[:10] + [9] * 40]
    assert shared_prefixes(sequences, 32) == [(100, [0, 3, 2])]


def test_shared_prefix_leaves_every_member_a_token():
    assert shared_prefixes([[1, 2, 3], [1, 2, 3]], 1) == [(2, [0, 1])]
    assert shared_prefixes([[1, 2, 3], [1, 2, 3, 4]], 1) == [(2, [0, 1])]


def test_no_groups_below_the_minimum():
    assert shared_prefixes([[1, 2, 3, 4], [1, 2, 5, 6]], 3) == []
    assert shared_prefixes([], 1) == []
