"""`reward-server`: start tritonserver on this project's model repository, supervised and fronted.

Lays out the python backend (backend.py), then runs tritonserver under a supervisor that restarts it
if a python-backend stub process dies (supervisor.py); SIGTERM/SIGINT are passed on. The environment
is set up the way the python-backend stub needs it:
- the interpreter's `bin` first on PATH: the stub takes its packages from the first `python3`;
- the interpreter's libpython folder first on LD_LIBRARY_PATH: the stub links libpython3.x, and a
  system copy of another patch release breaks the standard library.

Settings of the models (reward_server/settings.py) can be given as flags (`--max-tokens 8192`); each
becomes its `REWARD_*` environment variable for the models, paths made absolute here.

HTTP and metrics are served by the front (front.py): Triton's own HTTP and metrics listen on loopback
ports chosen here. gRPC is Triton's, on the public address, unless API keys are configured: then the
gRPC front (grpc_front.py) serves the public gRPC port, checks the keys and forwards to Triton's gRPC
on loopback.

Locked down by default (docs/security.md): model control is off (`--model-control-mode=none`), and the
model-repository, logging, trace, shared-memory and statistics APIs are restricted on HTTP (the front,
403) and gRPC (Triton's --grpc-restricted-protocol) to requests carrying `admin-key: KEY`. Without an
admin key, a random key made at each start that nobody is told closes them. An admin key (from
`--admin-key-file` or $REWARD_ADMIN_KEY, never from the command line) also allows explicit model
control. No key reaches tritonserver's command line, which `ps` shows to every local user: it gets
them through argv_secrets.py. `--tls-cert/--tls-key` serve gRPC over TLS (Triton's own) and HTTP over TLS (the front);
`--tls-client-ca` also requires client certificates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from secrets import token_urlsafe

from reward_client import AsyncRewardClient
from reward_client.protocol import ENSEMBLE_MODEL
from reward_server import gateway
from reward_server.gateway.auth import API_KEY_ENV, ApiKeys, read_api_keys
from reward_server.launcher import front, grpc_front
from reward_server.launcher.argv_secrets import Secrets, build_library
from reward_server.launcher.backend import DEFAULT_BACKENDS, layout_backend, pytriton_server_dir
from reward_server.launcher.repository import engine_instances, serving_repository
from reward_server.launcher.supervisor import supervise
from reward_server.settings import ALL, ENV_PREFIX, Settings, read_parameters

ADMIN_HEADER = front.ADMIN_HEADER
ADMIN_APIS = ",".join(front.RESTRICTED)
ADMIN_KEY_ENV = "REWARD_ADMIN_KEY"
GATEWAY_CONCURRENCY = 256


@dataclass(frozen=True)
class LoopbackPorts:
    """tritonserver's loopback ports behind the fronts; `grpc` is 0 when Triton serves gRPC publicly."""

    http: int
    metrics: int
    grpc: int = 0


def server_command(args: argparse.Namespace, repository: Path, admin_key: str | None, ports: LoopbackPorts, secrets: Secrets) -> list[str]:
    """tritonserver's command on `repository`: HTTP and metrics on loopback (behind the front), gRPC public
    or, with `ports.grpc`, on loopback (behind the gRPC front); the restricted APIs need the admin key (or a
    random one nobody is told), which appears as a `secrets` marker only."""
    control = ["--model-control-mode=explicit", "--load-model=*"] if admin_key else ["--model-control-mode=none"]
    restricted = secrets.marker(admin_key or token_urlsafe(32))
    control += [f"--http-restricted-api={ADMIN_APIS}:{ADMIN_HEADER}={restricted}"]
    control += [f"--grpc-restricted-protocol={ADMIN_APIS}:{ADMIN_HEADER}={restricted}"]
    tls = []
    if args.tls_cert and not ports.grpc:
        tls = ["--grpc-use-ssl=true", f"--grpc-server-cert={args.tls_cert}", f"--grpc-server-key={args.tls_key}"]
        if args.tls_client_ca:
            tls += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={args.tls_client_ca}"]
    return [
        args.tritonserver,
        f"--model-repository={repository}",
        *([f"--backend-directory={args.backend_directory}"] if args.backend_directory else []),
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc or args.grpc_port}",
        f"--metrics-port={ports.metrics}",
        "--http-address=127.0.0.1",
        f"--grpc-address={'127.0.0.1' if ports.grpc else args.address}",
        "--metrics-address=127.0.0.1",
        *control,
        *tls,
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--allow-metrics=true",
        "--allow-cpu-metrics=true",
        "--metrics-config=summary_latencies=true",  # 2.51 has latency summaries; histograms came later
        *args.extra,
    ]


def server_environment(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ADMIN_KEY_ENV, API_KEY_ENV)}  # the models have no use for them
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [libdir, env.get("LD_LIBRARY_PATH", "")] if p)
    # preprocessing tokenizes a batch's requests in one call, spread over the cores (inputs.py); the stubs are
    # exec'd, not forked from a process that used the tokenizer, so the fork hazard it guards against is absent
    env.setdefault("TOKENIZERS_PARALLELISM", "true")
    for f in fields(Settings):
        value = getattr(args, f"setting_{f.name}")
        if value is not None:
            env[ENV_PREFIX + f.name.upper()] = str(Path(value).resolve()) if f.metadata["kind"] == "path" else value
    return env


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reward-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model-repository", type=Path, default=Path("model_repository"), help="model repository (default: ./model_repository)"
    )
    parser.add_argument("--tritonserver", help="tritonserver binary (default: nvidia-pytriton's if installed, else tritonserver on PATH)")
    parser.add_argument(
        "--backend-directory",
        help=f"Triton backends (default with nvidia-pytriton's binary: its python backend laid out in {DEFAULT_BACKENDS})",
    )
    parser.add_argument("--address", default="0.0.0.0", help="address all endpoints bind to (default: 0.0.0.0)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default: 8000)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: 8001)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default: 8002)")
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=front.MAX_BODY_BYTES,
        help=f"largest HTTP request body accepted; larger ones get 413 (default: {front.MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--admin-key-file", type=Path, help=f"file holding the admin key (or ${ADMIN_KEY_ENV}): allow model control with it"
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        help=f"file of API keys, one per line (or ${API_KEY_ENV}): every route but health and metrics, HTTP and gRPC, "
        "needs 'Authorization: Bearer KEY' (docs/gateway.md)",
    )
    parser.add_argument(
        "--gateway-raw", action="store_true", help="/get_reward scores text in no known chat format as given instead of refusing it"
    )
    parser.add_argument(
        "--gateway-normalize",
        action="store_true",
        help="/get_reward answers (r - mean) / std with the checkpoint config.json's mean and std (OpenRLHF's normalize_reward)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTP and gRPC over TLS")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA: also require client certificates it signed (mutual TLS)")
    settings = parser.add_argument_group("model settings (each also $REWARD_<NAME>; README, 'Settings')")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        settings.add_argument(
            flag, dest=f"setting_{f.name}", metavar=f.name.upper(), help=f"{f.metadata['help']} (default: {_shown(f.default)})"
        )
    parser.add_argument("extra", nargs="*", help="further tritonserver flags, after --")
    return parser


def _shown(default: object) -> str:
    if isinstance(default, bool):  # before the lookup: 1 == True and 0 == False as dict keys
        return str(default).lower()
    return {None: "auto", "": "the ensemble's parameter"}.get(default, str(default))  # type: ignore[arg-type]


def read_secret(path: Path | None, env: str) -> str | None:
    """A secret from a file (stripped) or the environment; never from the command line."""
    if path is not None:
        secret = path.read_text().strip()
        if not secret:
            raise SystemExit(f"reward-server: {path} is empty")
        return secret
    return os.environ.get(env) or None


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser().error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:  # else served in plain text, no client checked: refused, not ignored
        parser().error("--tls-client-ca needs --tls-cert and --tls-key (client certificates are checked over TLS only)")
    try:
        check_settings(args, server_environment(args))
    except ValueError as exc:
        parser().error(str(exc))
    admin_key = read_secret(args.admin_key_file, ADMIN_KEY_ENV)
    try:
        args.api_keys = read_api_keys(args.api_key_file)
    except (OSError, ValueError) as exc:
        parser().error(str(exc))
    if args.tritonserver is None:
        try:
            args.tritonserver = str(pytriton_server_dir() / "bin" / "tritonserver")
            args.backend_directory = args.backend_directory or str(layout_backend(DEFAULT_BACKENDS).resolve())
        except SystemExit:
            args.tritonserver = shutil.which("tritonserver") or parser().error(
                "no tritonserver: install nvidia-pytriton or give --tritonserver"
            )
    scheme = "https" if args.tls_cert else "http"
    print(f"tritonserver: {scheme} :{args.http_port}  gRPC :{args.grpc_port}  metrics :{args.metrics_port}/metrics", flush=True)
    sys.exit(asyncio.run(serve(args, admin_key)))


async def serve(args: argparse.Namespace, admin_key: str | None) -> int:
    """The supervised tritonserver, its HTTP and metrics on loopback ports behind the front, and its
    gRPC too behind the gRPC front when there are API keys."""
    env = server_environment(args)
    api_keys = getattr(args, "api_keys", ())
    ports = LoopbackPorts(*free_loopback_ports(3 if api_keys else 2, exclude={args.http_port, args.grpc_port, args.metrics_port}))
    context = front.server_context(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    counters = front.FrontMetrics()
    # The RLHF gateway's routes call the ensemble on Triton's loopback HTTP: plain, never key-restricted.
    options = gateway.Options(api_keys=api_keys, raw=args.gateway_raw, registry=counters.registry, **_gateway_settings(args, env))
    # Its own limit on calls in flight, above any one trainer's: Triton queues and batches them.
    upstream = lambda: AsyncRewardClient(f"http://127.0.0.1:{ports.http}", concurrency=GATEWAY_CONCURRENCY)  # noqa: E731
    hook = lambda app: gateway.install(app, upstream, options)  # noqa: E731
    app = front.application(
        f"http://127.0.0.1:{ports.http}", admin_key=admin_key, max_body_bytes=args.max_body_bytes, metrics=counters, install=[hook]
    )
    runners = [
        await front.start(app, args.address, args.http_port, context),
        await front.start(front.metrics_application(f"http://127.0.0.1:{ports.metrics}", counters), args.address, args.metrics_port),
    ]
    grpc = None
    if ports.grpc:
        grpc = grpc_front.GrpcFront(f"127.0.0.1:{ports.grpc}", ApiKeys(api_keys), grpc_front.GrpcMetrics(counters.registry))
        tls = grpc_front.credentials(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
        await grpc.start(args.address, args.grpc_port, tls)
    try:
        instances = engine_instances(args.model_repository, env)
        # A view of the repository only when it must differ (a read-only /tmp then needs $TMPDIR).
        with tempfile.TemporaryDirectory(prefix="reward-repository-") if instances > 1 else contextlib.nullcontext() as view:
            try:
                repository = serving_repository(args.model_repository, instances, Path(view)) if view else args.model_repository
            except ValueError as exc:
                raise SystemExit(f"reward-server: {exc}") from None
            keys = Secrets()
            command = server_command(args, repository, admin_key, ports, keys)
            return await supervise(command, keys.environment(build_library(), env), f"http://127.0.0.1:{ports.http}")
    finally:
        if grpc:
            await grpc.stop()
        for runner in runners:
            await runner.cleanup()


def check_settings(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Resolve each model's settings as it will at load: a bad value (`--dtype BF16`) is refused before
    tritonserver starts, not when its models load, and named by the flag it came from. ValueError says what
    (the message names the environment variable or config.pbtxt otherwise)."""
    repository = Path(args.model_repository).resolve()
    for model in ALL:
        config = repository / model / "config.pbtxt"
        if not config.exists():
            continue  # a repository without that model
        try:
            Settings.for_model(config.parent, read_parameters(config), env)
        except ValueError as exc:
            message = str(exc)
            for f in fields(Settings):
                if getattr(args, f"setting_{f.name}") is not None:
                    message = message.replace(f"${ENV_PREFIX}{f.name.upper()}:", f"--{f.name.replace('_', '-')}:")
            raise ValueError(message) from None


def _gateway_settings(args: argparse.Namespace, env: dict[str, str]) -> dict:
    """What the gateway takes from the models' settings: max_tokens (/v1/models) and, with
    --gateway-normalize, the checkpoint's reward mean and std."""
    ensemble = Path(args.model_repository).resolve() / ENSEMBLE_MODEL
    try:
        settings = Settings.resolve([(ensemble, read_parameters(ensemble / "config.pbtxt"))], env)
    except ValueError:
        settings = None  # the models report it when they load
    found = {"max_tokens": settings.max_tokens} if settings else {}
    if args.gateway_normalize:
        found["normalize"] = settings and settings.checkpoint and gateway.checkpoint_normalization(settings.checkpoint)
        if not found["normalize"]:
            raise SystemExit("reward-server: --gateway-normalize needs normalize_reward, mean and std in the checkpoint's config.json")
    return found


def free_loopback_ports(count: int, exclude: set[int]) -> list[int]:
    """`count` distinct free loopback ports for Triton, none of `exclude` (the public ports, which the
    kernel could hand out again: nothing is bound to them yet)."""
    with contextlib.ExitStack() as held:  # held until all are chosen: distinct
        ports: list[int] = []
        while len(ports) < count:
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            if sock.getsockname()[1] not in exclude:
                ports.append(sock.getsockname()[1])
        return ports


if __name__ == "__main__":
    main()
