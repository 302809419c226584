"""Checks that the Python running a Triton model can run it correctly, made at the model's load."""

from __future__ import annotations

import numpy as np


def check_numpy(version: str = np.__version__) -> None:
    """Refuse numpy 2 under the python backend of tritonserver 2.51 (the one `make setup` installs:
    nvidia-pytriton 0.7.0 bundles python_backend r24.10). Its stub is built with pybind11 2.10, which
    reads numpy's array descriptor with the numpy 1 layout: under numpy 2 it takes an item size of 0,
    so every input tensor arrives as copies of its first element (FP32 [1, 2, 3] as [1, 1, 1]) and a
    BYTES tensor's lengths as its first byte repeated (the stub crashes, or reads past the row).
    python_backend r24.11 (Triton 2.52) moved to pybind11 2.12, which supports numpy 2
    (triton-inference-server/python_backend#384); a stub built from it may lift this check."""
    if int(version.split(".")[0]) >= 2:
        raise RuntimeError(
            f"numpy {version} is installed in the Python that runs this model: the python backend of tritonserver 2.51 "
            "(its stub built with pybind11 2.10) misreads every input tensor under numpy 2, BYTES inputs included "
            "(each tensor becomes copies of its first element). Install numpy<2 in that Python: pip install 'numpy<2'"
        )
