"""Lay out a Triton backend folder for the python backend from the nvidia-pytriton wheel.

The wheel ships `tritonserver`, `libtriton_python.so` and one python-backend stub per Python
version. Triton wants them together as `<dir>/python/`, with the stub built for the Python
that runs the models; this links them under a folder of our own (site-packages stays as
installed). Links, not copies: the stub finds its libraries relative to its real location.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path

DEFAULT_BACKENDS = Path(".build") / "triton" / "backends"


def pytriton_server_dir() -> Path:
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nvidia-pytriton is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def tritonserver_binary() -> Path:
    return pytriton_server_dir() / "bin" / "tritonserver"


def layout_backend(out: Path = DEFAULT_BACKENDS) -> Path:
    """Create `<out>/python/` with the backend library, its utils and this Python's stub."""
    source = pytriton_server_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise SystemExit(f"nvidia-pytriton has no python-backend stub for Python {version}")
    target = out / "python"
    target.mkdir(parents=True, exist_ok=True)
    for path in (
        source / "backends" / "python" / "libtriton_python.so",
        source / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        link = target / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(path)
    return out
