"""Keys kept out of tritonserver's command line, where `ps` would show them to every local user.

Triton 2.51 takes restricted-API keys only as flags. Each flag gets a marker instead of its key, the key
goes in the environment (readable by the server's own user only), and `argv_secrets.c`, preloaded into
tritonserver, puts the keys in place before Triton reads its arguments (see the C file). The library is
built once with the system's C compiler, by the launcher at its first start (and by both Dockerfiles)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("argv_secrets.c")
LIBRARY_DIR = Path(".build") / "triton"  # beside the python backend's layout (backend.py), under the working directory
PREFIX = "REWARD_SECRET_"


class Secrets:
    """Markers for a command line, and the environment that carries their keys."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def marker(self, key: str) -> str:
        name = f"{PREFIX}{len(self.values)}"
        self.values[name] = key
        return f"\1{name}\1"

    def environment(self, library: Path, env: dict[str, str]) -> dict[str, str]:
        preload = " ".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
        return {**env, **self.values, "LD_PRELOAD": preload}


def build_library(out: Path = LIBRARY_DIR) -> Path:
    """`out`/argv_secrets.so (absolute), compiled from the C source when missing or older than it."""
    library = out.resolve() / "argv_secrets.so"
    if library.exists() and library.stat().st_mtime >= SOURCE.stat().st_mtime:
        return library
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise SystemExit("reward-server: no C compiler (cc) to build argv_secrets.so, which keeps keys out of `ps`: install gcc")
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as built:  # servers may start side by side
        pass
    try:
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", built.name, str(SOURCE)], check=True)
        os.replace(built.name, library)
    finally:
        Path(built.name).unlink(missing_ok=True)
    return library
