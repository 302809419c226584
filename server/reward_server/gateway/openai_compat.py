"""OpenAI-compatible scoring as NVIDIA's hosted reward models answer it (build.nvidia.com /
integrate.api.nvidia.com/v1; nemotron-4-340b-reward, llama-3.1-nemotron-70b-reward).

POST /v1/chat/completions with `messages` ending in the assistant turn to score ->
choices[0].message.content "reward:-3.28" (every head output, "name:value" joined by ","),
choices[0].logprobs.content one {"token": name, "logprob": value} per output (what NeMo-Curator's
OpenAIClient.query_reward_model reads), finish_reason "length", usage. GET /v1/models lists the model.
Sampling parameters are accepted and ignored: nothing is generated.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from reward_client.errors import InvalidConversationError
from reward_client.inputs import conversation_inputs
from reward_server.gateway.common import OPTIONS, bad_request, json_object, now, route, score_items

STARTED = now()


@route("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.Response:
    body = await json_object(request)
    if body.get("stream"):
        raise bad_request("stream: a reward is one answer; send stream false")
    if body.get("n", 1) != 1:
        raise bad_request("n: a conversation has one reward; send n 1")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("messages: expected a list of messages ending with the assistant turn to score")
    try:
        item = conversation_inputs([_message(m, i) for i, m in enumerate(messages)])
    except InvalidConversationError as exc:
        raise bad_request(f"messages: {exc}", "invalid") from None
    [score], [tokens] = await score_items(request, [item], "messages", indexed=False)
    content = ",".join(f"{name}:{value!r}" for name, value in score.attributes.items())
    logprobs = [{"token": name, "logprob": value, "bytes": None, "top_logprobs": []} for name, value in score.attributes.items()]
    choice = {
        "index": 0,
        "finish_reason": "length",
        "message": {"role": "assistant", "content": content},
        "logprobs": {"content": logprobs},
    }
    return web.json_response(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": now(),
            "model": request.app[OPTIONS].model_name,
            "choices": [choice],
            "usage": {"prompt_tokens": tokens, "completion_tokens": 1, "total_tokens": tokens + 1},
        }
    )


# Who spoke (`name`), and what an SDK's assistant reply carries unused (null): nothing of the text scored.
NAMED = ("name",)
UNUSED_WHEN_NULL = ("refusal", "tool_calls", "function_call", "audio")


def _message(message: Any, index: int) -> Any:
    """OpenAI's content parts ([{"type": "text", "text": ...}]) joined into one string, `name` and null
    reply fields dropped; the rest is checked by the conversation schema."""
    if not isinstance(message, dict):
        return message
    message = {k: v for k, v in message.items() if k not in NAMED and not (k in UNUSED_WHEN_NULL and v is None)}
    if isinstance(message.get("content"), list):
        parts = message["content"]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            raise bad_request(f"messages[{index}].content: only text parts are scored")
        return {**message, "content": "".join(p["text"] for p in parts)}
    return message


@route("/v1/models")
async def models(request: web.Request) -> web.Response:
    options = request.app[OPTIONS]
    card = {
        "id": options.model_name,
        "object": "model",
        "created": STARTED,
        "owned_by": "reward-model-server",
        "root": options.model_name,
        "parent": None,
        "max_model_len": options.max_tokens,
    }
    return web.json_response({"object": "list", "data": [card]})
