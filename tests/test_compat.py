"""The numpy<2 guard: refused with a message that names the version and the fix, and every Python
model runs it first thing in `initialize` (before any tensor reaches it)."""

from __future__ import annotations

import ast

import numpy as np
import pytest

from reward_server.compat import check_numpy
from tests.live_server import REPO


@pytest.mark.parametrize("version", ["2.0.0", "2.5.2"])
def test_numpy_2_is_refused_with_the_version_and_the_fix(version):
    with pytest.raises(RuntimeError) as refused:
        check_numpy(version)
    message = str(refused.value)
    assert f"numpy {version}" in message and "tritonserver 2.51" in message and "pip install 'numpy<2'" in message


@pytest.mark.parametrize("version", ["1.26.4", "1.24.0"])
def test_numpy_1_is_accepted(version):
    check_numpy(version)


def test_this_environment_runs_numpy_1():
    assert int(np.__version__.split(".")[0]) < 2
    check_numpy()


MODELS = sorted(REPO.glob("model_repository/*/1/model.py"))


def test_every_python_model_is_checked():
    assert {p.parent.parent.name for p in MODELS} >= {"preprocessing", "reward_engine", "nemo_reward_model"}


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.parent.parent.name)
def test_initialize_calls_check_numpy_first(path):
    tree = ast.parse(path.read_text())
    model = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TritonPythonModel")
    initialize = next(n for n in model.body if isinstance(n, ast.FunctionDef) and n.name == "initialize")
    body = [n for n in initialize.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]  # past a docstring
    first = body[0]
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Call), ast.unparse(first)
    assert ast.unparse(first.value) == "check_numpy()", ast.unparse(first)
    imports = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "reward_server.compat"]
    assert any(alias.name == "check_numpy" for node in imports for alias in node.names)
