"""Start tritonserver on this project's model repository.

Lays out the python backend (see triton_backend.py), then runs tritonserver under a supervisor
that restarts it if a python-backend stub process dies (supervisor.py); SIGTERM/SIGINT are passed
on. The environment is set up the way the python-backend stub needs it:
- the virtualenv's `bin` first on PATH: the stub takes its packages from the first `python3`;
- the virtualenv interpreter's libpython folder first on LD_LIBRARY_PATH: the stub links
  libpython3.x, and a system copy of another patch release breaks the standard library.

Locked down by default: model control is off (`--model-control-mode=none`: nothing can load or
unload models). `--admin-key` instead allows explicit model control, and restricts the
model-repository, logging and trace APIs (HTTP and gRPC) to requests carrying `admin-key: KEY`.
`--tls-cert/--tls-key` serve gRPC over TLS (Triton's own) and HTTP over TLS (a terminator in this
process in front of Triton's loopback-only plain HTTP, see tls_proxy.py); `--tls-client-ca` also
requires client certificates.

    python build/serve.py [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]
                          [--admin-key KEY] [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]] [-- extra tritonserver flags]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import sysconfig
from pathlib import Path

from supervisor import supervise
from tls_proxy import serve as serve_tls
from tls_proxy import server_context
from triton_backend import DEFAULT_BACKENDS, REPO, layout_backend, tritonserver_binary

ADMIN_HEADER = "admin-key"  # gRPC metadata keys are lower case; HTTP headers match case-insensitively
ADMIN_APIS = "model-repository,logging,trace"


def server_command(args: argparse.Namespace, http_port: int, http_address: str) -> list[str]:
    if args.admin_key:
        control = ["--model-control-mode=explicit", "--load-model=*"]
        control += [f"--http-restricted-api={ADMIN_APIS}:{ADMIN_HEADER}={args.admin_key}"]
        control += [f"--grpc-restricted-protocol={ADMIN_APIS}:{ADMIN_HEADER}={args.admin_key}"]
    else:
        control = ["--model-control-mode=none"]
    tls = []
    if args.tls_cert:
        tls = ["--grpc-use-ssl=true", f"--grpc-server-cert={args.tls_cert}", f"--grpc-server-key={args.tls_key}"]
        if args.tls_client_ca:
            tls += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={args.tls_client_ca}"]
    return [
        str(tritonserver_binary()),
        f"--model-repository={args.model_repository}",
        f"--backend-directory={args.backend_directory}",
        f"--http-port={http_port}",
        f"--grpc-port={args.grpc_port}",
        f"--metrics-port={args.metrics_port}",
        f"--http-address={http_address}",
        f"--grpc-address={args.address}",
        f"--metrics-address={args.address}",
        *control,
        *tls,
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
    parser.add_argument("--admin-key", default=os.environ.get("REWARD_ADMIN_KEY"), help="allow model control with this key")
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTP and gRPC over TLS")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA: also require client certificates it signed (mutual TLS)")
    parser.add_argument("extra", nargs="*", help="further tritonserver flags, after --")
    args = parser.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")

    layout_backend(args.backend_directory)
    scheme = "https" if args.tls_cert else "http"
    print(f"tritonserver: {scheme} :{args.http_port}  gRPC :{args.grpc_port}  metrics :{args.metrics_port}/metrics", flush=True)
    sys.exit(asyncio.run(serve(args)))


async def serve(args: argparse.Namespace) -> int:
    """The supervised tritonserver; with TLS, its plain HTTP on a loopback port behind the terminator."""
    if not args.tls_cert:
        command = server_command(args, args.http_port, args.address)
        return await supervise(command, server_environment(), f"http://127.0.0.1:{args.http_port}")
    internal = _free_loopback_port()
    proxy = await serve_tls(args.address, args.http_port, internal, server_context(args.tls_cert, args.tls_key, args.tls_client_ca))
    try:
        command = server_command(args, internal, "127.0.0.1")
        return await supervise(command, server_environment(), f"http://127.0.0.1:{internal}")
    finally:
        proxy.close()


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
