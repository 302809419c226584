"""The public gRPC front, used when API keys are configured: tritonserver's gRPC then listens on
loopback behind it.

Why: Triton 2.51 restricts a gRPC protocol with one `--grpc-restricted-protocol` flag holding one key
value, so with several API keys only the first would open gRPC inference, and a refused call is
answered UNAVAILABLE, the status of an outage. Here every call but the health checks (ServerLive,
ServerReady, ModelReady) needs `authorization: Bearer KEY` with any of the keys (gateway/auth.py, the
HTTP front's check), else UNAUTHENTICATED.

Calls are forwarded as raw bytes (nothing is parsed or copied into protobuf objects), every method as
a stream: on the wire a unary call is a stream of one message each way, so one handler serves
ModelInfer and ModelStreamInfer alike. The caller's metadata (less its key), deadline and
cancellation go upstream; answers, status, details and trailing metadata come back. Triton's own
admin-key restriction of the model-repository, logging, trace, shared-memory and statistics APIs still
applies (their `triton-grpc-protocol-admin-key` metadata is forwarded). While tritonserver restarts,
calls are answered UNAVAILABLE, which clients retry: also a call it was killed in the middle of, which grpc
ends with its own INTERNAL "Internal error from Core" (a stream still being written when its peer went away).
Message sizes are unlimited, as on Triton's gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import prometheus_client
from tritonclient.grpc import service_pb2

from reward_client.protocol import GRPC_LOST_CALL
from reward_server.gateway.auth import ApiKeys

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
OPEN = {f"/{SERVICE.full_name}/{name}" for name in ("ServerLive", "ServerReady", "ModelReady")}
# Metric labels stay bounded: a caller can name any method.
METHODS = {f"/{SERVICE.full_name}/{method.name}": method.name for method in SERVICE.methods}
UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
NOT_FORWARDED = {"authorization", "user-agent"}  # the key stays here; the channel sets its own user agent


class GrpcMetrics:
    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.calls = prometheus_client.Counter(
            "reward_grpc_requests", "gRPC calls answered by the gRPC front, by method and status", ["method", "code"], registry=registry
        )


class Forwarder(grpc.GenericRpcHandler):
    """Every method, key-checked, forwarded to `upstream` (a channel to tritonserver's gRPC)."""

    def __init__(self, upstream: grpc.aio.Channel, keys: ApiKeys, metrics: GrpcMetrics) -> None:
        self.upstream, self.keys, self.metrics = upstream, keys, metrics

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        async def forward(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            # Counted before the status goes out (abort sends it): a caller that reads the metrics
            # once its call has ended finds the call counted.
            def count(code: grpc.StatusCode) -> None:
                self.metrics.calls.labels(METHODS.get(details.method, "other"), code.name).inc()

            try:
                async for answer in self._forward(details.method, requests, context):
                    yield answer
            except grpc.aio.AioRpcError as exc:  # upstream's status, passed on as it is
                code, message = exc.code(), exc.details() or ""
                if code == grpc.StatusCode.INTERNAL and message == GRPC_LOST_CALL:  # grpc's, not Triton's: tritonserver went away
                    code, message = grpc.StatusCode.UNAVAILABLE, "tritonserver went away during the call (restarting?)"
                count(code)
                await context.abort(code, message, exc.trailing_metadata() or ())
            except _Refused:
                count(grpc.StatusCode.UNAUTHENTICATED)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Unauthorized")
            except (asyncio.CancelledError, GeneratorExit):  # the caller went away (GeneratorExit: closed at a yield)
                count(grpc.StatusCode.CANCELLED)
                raise
            except Exception:
                count(grpc.StatusCode.UNKNOWN)  # what grpc answers for a handler's own failure
                raise
            else:
                count(grpc.StatusCode.OK)  # the OK status follows this generator's end

        return grpc.stream_stream_rpc_method_handler(forward)  # no (de)serializers: raw bytes

    async def _forward(self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        metadata = context.invocation_metadata() or ()
        if method not in OPEN and not self.keys.accept(next((v for k, v in metadata if k == "authorization"), None)):
            raise _Refused
        call = self.upstream.stream_stream(method)(
            requests, metadata=[(k, v) for k, v in metadata if k not in NOT_FORWARDED], timeout=context.time_remaining()
        )
        try:
            async for answer in call:
                yield answer
        finally:
            call.cancel()  # the caller went away or the call ended: a no-op once it has ended


class _Refused(Exception):
    pass


def credentials(cert_file: str, key_file: str, client_ca_file: str | None) -> grpc.ServerCredentials:
    """TLS for the public port; with `client_ca_file`, clients must present a certificate it signed."""
    ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    pair = (Path(key_file).read_bytes(), Path(cert_file).read_bytes())
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


class GrpcFront:
    """The gRPC front on `address:port`, forwarding to `upstream` (host:port, plain)."""

    def __init__(self, upstream: str, keys: ApiKeys, metrics: GrpcMetrics) -> None:
        self.channel = grpc.aio.insecure_channel(upstream, options=UNLIMITED)
        self.server = grpc.aio.server(options=UNLIMITED)
        self.server.add_generic_rpc_handlers((Forwarder(self.channel, keys, metrics),))

    async def start(self, address: str, port: int, tls: grpc.ServerCredentials | None = None) -> None:
        bind = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        self.server.add_secure_port(bind, tls) if tls else self.server.add_insecure_port(bind)  # raises if it cannot bind
        await self.server.start()

    async def stop(self, grace_s: float = 5) -> None:
        await self.server.stop(grace_s)
        await self.channel.close()
