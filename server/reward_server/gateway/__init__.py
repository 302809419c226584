"""The gateway: other RLHF frameworks' reward-server wire formats on the front's HTTP port, beside
KServe v2 (docs/gateway.md). Each route calls the ensemble through reward_client.AsyncRewardClient.

    install(app, lambda: AsyncRewardClient(f"127.0.0.1:{grpc_port}"), Options(api_keys=keys))

must run before the front adds its KServe catch-all route (aiohttp matches routes in the order they
were added) and before the application starts.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from reward_client import AsyncRewardClient
from reward_server.gateway import auth, openai_compat, openrlhf, pooling
from reward_server.gateway.common import CLIENT, METRICS, OPTIONS, Metrics, Options, checkpoint_normalization

__all__ = ["Options", "checkpoint_normalization", "install"]


def install(app: web.Application, client_factory: Callable[[], AsyncRewardClient], options: Options) -> None:
    """Add the gateway's routes, its metrics and (with `options.api_keys`) the key check on every
    route of `app` except health and metrics; the client is opened with the app and closed with it."""
    app[OPTIONS], app[METRICS] = options, Metrics(options.registry)
    if options.api_keys:
        app.middlewares.append(auth.middleware(options.api_keys))  # after the front's own (its request counts)
    app.router.add_post("/get_reward", openrlhf.get_reward)
    app.router.add_post("/classify", pooling.classify)
    app.router.add_post("/pooling", pooling.pooling)
    app.router.add_post("/v1/chat/completions", openai_compat.chat_completions)
    app.router.add_get("/v1/models", openai_compat.models)

    async def client(app: web.Application):
        app[CLIENT] = client_factory()
        yield
        await app[CLIENT].close()

    app.cleanup_ctx.append(client)
