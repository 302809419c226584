"""The `tensorrt_llm` runtime end to end: convert the demo checkpoint, build an engine, score.

Runs only where `tensorrt_llm` imports and a GPU is visible (NVIDIA's trtllm container); everywhere
else it is skipped with that reason, and the runtime counts as unverified.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.live_server import REPO

tensorrt_llm = pytest.importorskip("tensorrt_llm", reason="needs tensorrt_llm (NVIDIA's tritonserver:<yy.mm>-trtllm-python-py3 container)")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_engine_scores_like_the_reference(checkpoint, tmp_path, reference_model):
    from reward_server.runtimes.trtllm_runtime import TrtllmRewardEngine
    from reward_server.settings import Settings

    engine_dir = tmp_path / "engine"
    build = [sys.executable, str(REPO / "build" / "trtllm_engine.py"), "--checkpoint", str(checkpoint), "--out", str(engine_dir)]
    subprocess.run(build, check=True)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 128000, n) for n in (5, 300, 2000)]
    got = TrtllmRewardEngine(str(engine_dir), Settings.max_tokens).score(sequences)[:, 0]  # the build's default
    with torch.inference_mode():
        expected = np.array([reference_model(torch.from_numpy(s)[None]).logits[0, -1, 0].item() for s in sequences])
    assert np.abs(got - expected).max() <= 0.05  # bf16 engine against the fp32 reference
