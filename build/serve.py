"""Start tritonserver on this project's model repository.

Lays out the python backend (see triton_backend.py), then replaces this process with
tritonserver, so signals sent to it reach the server directly. The environment is set up
the way the python-backend stub needs it:
- the virtualenv's `bin` first on PATH: the stub takes its packages from the first `python3`;
- the virtualenv interpreter's libpython folder first on LD_LIBRARY_PATH: the stub links
  libpython3.x, and a system copy of another patch release breaks the standard library.

    python build/serve.py [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002] [-- extra tritonserver flags]
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from pathlib import Path

from triton_backend import DEFAULT_BACKENDS, REPO, layout_backend, tritonserver_binary


def server_command(args: argparse.Namespace) -> list[str]:
    return [
        str(tritonserver_binary()),
        f"--model-repository={args.model_repository}",
        f"--backend-directory={args.backend_directory}",
        f"--http-port={args.http_port}",
        f"--grpc-port={args.grpc_port}",
        f"--metrics-port={args.metrics_port}",
        f"--http-address={args.address}",
        f"--grpc-address={args.address}",
        f"--metrics-address={args.address}",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--allow-metrics=true",
        "--allow-cpu-metrics=true",
        "--metrics-config=summary_latencies=true",  # 2.51 has latency summaries; histograms came later
        *args.extra,
    ]


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [libdir, env.get("LD_LIBRARY_PATH", "")] if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model-repository", type=Path, default=REPO / "model_repository", help="model repository (default: ./model_repository)"
    )
    parser.add_argument("--backend-directory", type=Path, default=DEFAULT_BACKENDS, help="where the python backend is laid out")
    parser.add_argument("--address", default="0.0.0.0", help="address all endpoints bind to (default: 0.0.0.0)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default: 8000)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: 8001)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default: 8002)")
    parser.add_argument("extra", nargs="*", help="further tritonserver flags, after --")
    args = parser.parse_args()

    layout_backend(args.backend_directory)
    command = server_command(args)
    print(f"tritonserver: HTTP :{args.http_port}  gRPC :{args.grpc_port}  metrics :{args.metrics_port}/metrics", flush=True)
    os.execve(command[0], command, server_environment())


if __name__ == "__main__":
    main()
