"""RewardBench section scores against the rewardbench package itself (0.1.4, installed with --no-deps
by `make setup`) as the oracle: the same subset weights and sections, the same weighted means."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import random
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from reward_client import rewardbench


def load_oracle() -> tuple[Callable, ModuleType]:
    """`calculate_scores_per_section` and the constants module of the installed rewardbench, without
    running its imports: rewardbench/__init__.py and utils.py import torch, datasets, fastchat, ..."""
    spec = importlib.util.find_spec("rewardbench")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("rewardbench is not installed: `make setup` (pip install --no-deps rewardbench==0.1.4)")
    package = Path(next(iter(spec.submodule_search_locations)))
    constants_spec = importlib.util.spec_from_file_location("_rewardbench_constants", package / "constants.py")
    constants = importlib.util.module_from_spec(constants_spec)
    constants_spec.loader.exec_module(constants)  # constants.py imports nothing
    utils = package / "utils.py"
    tree = ast.parse(utils.read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_scores_per_section")
    namespace: dict = {}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(utils), "exec"), namespace)  # it uses no globals
    return namespace["calculate_scores_per_section"], constants


def test_oracle_is_rewardbench_0_1_4():
    assert importlib.metadata.version("rewardbench") == "0.1.4"


def test_weights_and_sections_are_the_packages():
    _, constants = load_oracle()
    assert rewardbench.EXAMPLE_COUNTS == constants.EXAMPLE_COUNTS
    assert rewardbench.SECTIONS == {name: list(members) for name, members in constants.SUBSET_MAPPING.items()}


@pytest.mark.parametrize("dropped", [0.0, 0.3, 0.7])
def test_section_scores_match_the_package_on_200_random_accuracies(dropped):
    calculate, constants = load_oracle()
    rng = random.Random(f"rewardbench-{dropped}")
    for _ in range(200):
        accuracy = {s: rng.random() for s in constants.EXAMPLE_COUNTS if rng.random() >= dropped}
        accuracy["anthropic_helpful"] = rng.random()  # in no section: ignored by both
        expected = calculate(constants.EXAMPLE_COUNTS, constants.SUBSET_MAPPING, accuracy)
        got = rewardbench.section_scores(accuracy)
        for section, members in constants.SUBSET_MAPPING.items():
            if any(s in accuracy for s in members):
                assert got[section] == pytest.approx(100 * expected[section], abs=1e-9), (section, accuracy)
            else:
                assert expected[section] == 0 and got[section] is None  # the package says 0, we say None
        known = [got[s] for s in constants.SUBSET_MAPPING if got[s] is not None]
        assert got["Score"] == (pytest.approx(sum(known) / len(known)) if known else None)
