"""OpenRLHF's remote reward model: POST /get_reward (openrlhf/cli/serve_rm.py, v0.8.3 to v0.11.2).

{"query": [str], "prompts": [...], "labels": [...]} -> {"rewards": [float], "scores": [float],
"extra_logs": {"dummy_scores": [float], <attribute>: [float] for heads with several outputs}}.
Each query is prompt + response in the *policy's* chat template; it is parsed back into messages
(chat_formats) and scored with the reward model's own template. A query in no known format is a 400,
unless the request says `"raw": true` or the server was started with --gateway-raw: then it is scored
as given (TEXT, with the tokenizer's BOS once).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from reward_client.errors import InvalidConversationError
from reward_client.inputs import conversation_inputs, text_inputs
from reward_server.gateway.chat_formats import UnknownFormat, parse
from reward_server.gateway.common import OPTIONS, bad_request, json_object, optional, request_items, route, score_items


@route("/get_reward")
async def get_reward(request: web.Request) -> web.Response:
    body = await json_object(request)
    queries = body.get("query")
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) for q in queries):
        raise bad_request("query: expected a non-empty list of strings (prompt + response in the policy's chat template)")
    options = request.app[OPTIONS]
    raw = optional(body, "raw", bool, options.raw)
    items = request_items(queries, lambda i, query: _item(i, query, raw), "query")
    scores, _ = await score_items(request, items, "query")
    rewards = [_normalized(float(s), options.normalize) for s in scores]
    extra_logs: dict[str, Any] = {"dummy_scores": rewards}
    if len(scores[0].attributes) > 1:  # every output of a multi-attribute head, for the trainer's logs
        extra_logs.update({name: [s.attributes[name] for s in scores] for name in scores[0].attributes})
    return web.json_response({"rewards": rewards, "scores": rewards, "extra_logs": extra_logs})


def _item(index: int, query: str, raw: bool) -> dict:
    try:
        name, messages = parse(query)
    except UnknownFormat as exc:
        if raw:
            return text_inputs(query)
        raise bad_request(
            f'query[{index}]: {exc}; send "raw": true (or start the server with --gateway-raw) to score it as given', "format"
        ) from None
    try:
        return conversation_inputs(messages)
    except InvalidConversationError as exc:
        raise bad_request(f"query[{index}]: read as {name} chat format: {exc}", "invalid") from None


def _normalized(reward: float, normalize: tuple[float, float] | None) -> float:
    if normalize is None:
        return reward
    mean, std = normalize
    return (reward - mean) / std
