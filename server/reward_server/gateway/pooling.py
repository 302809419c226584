"""vLLM's POST /classify and POST /pooling (vllm 0.33.0, vllm/entrypoints/pooling/), and SGLang's
native POST /classify (sglang 0.5.23, srt/entrypoints/http_server.py) on the same path.

/classify bodies are told apart by their keys: `input` or `messages` is vLLM's request (answered
with its {"id", "object": "list", "data": [...], "usage"} envelope); `text` or `input_ids` is
SGLang's (answered with a bare {"embedding", "meta_info"} per item, a JSON array for a batch);
both or neither is a 400.

vLLM's activation: `use_activation` (default true, as vLLM) applies a sigmoid to one-output heads,
as vLLM does for one-label classifiers; a head with several outputs (SteerLM attributes, regression)
is answered as is. `use_activation: false` (verl's) always gives the raw reward; the older
`activation` is honoured as its alias (vLLM >= 0.11.2 silently ignores it). SGLang answers raw outputs.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from aiohttp import web

from reward_client import Score
from reward_client.errors import InvalidConversationError
from reward_client.inputs import conversation_inputs, text_inputs, token_inputs
from reward_server.gateway.common import (
    ENVELOPE,
    NO_LIMIT,
    OPTIONS,
    GatewayError,
    bad_request,
    json_object,
    now,
    optional,
    request_items,
    route,
    score_items,
)

VLLM_KEYS, SGLANG_KEYS = ("input", "messages"), ("text", "input_ids")
REMOVED = {"normalize": "use_activation", "softmax": "use_activation"}


@route("/classify")
async def classify(request: web.Request) -> web.Response:
    body = await json_object(request)
    vllm, sglang = [k for k in VLLM_KEYS if k in body], [k for k in SGLANG_KEYS if k in body]
    if bool(vllm) == bool(sglang):
        raise bad_request(
            f"body: send vLLM's `input` or `messages`, or SGLang's `text` or `input_ids`, exactly one kind (got {vllm + sglang or 'none'})"
        )
    if sglang:
        request[ENVELOPE] = sglang_error
        return await sglang_classify(request, body)
    return await vllm_classify(request, body)


async def vllm_classify(request: web.Request, body: dict[str, Any]) -> web.Response:
    scores, tokens = await _vllm_scores(request, body)
    activate = _use_activation(body)
    data = []
    for i, score in enumerate(scores):
        probs = _probs(score, activate)
        names = list(score.attributes)
        data.append({"index": i, "label": names[max(range(len(probs)), key=probs.__getitem__)], "probs": probs, "num_classes": len(probs)})
    return web.json_response(_envelope("classify", request, data, tokens))


@route("/pooling")
async def pooling(request: web.Request) -> web.Response:
    body = await json_object(request)
    if body.get("task") not in (None, "classify"):
        raise bad_request(f"task: {body['task']!r} is not served; this reward model serves task 'classify'")
    if body.get("encoding_format", "float") != "float":
        raise bad_request("encoding_format: only 'float' is served")
    scores, tokens = await _vllm_scores(request, body)
    activate = _use_activation(body)
    data = [{"index": i, "object": "pooling", "data": _probs(score, activate)} for i, score in enumerate(scores)]
    return web.json_response(_envelope("pool", request, data, tokens))


def _use_activation(body: dict[str, Any]) -> bool:
    return optional(body, "use_activation", bool, optional(body, "activation", bool, True))


def _probs(score: Score, activate: bool) -> list[float]:
    values = list(score.attributes.values())
    if activate and len(values) == 1:
        return [_sigmoid(values[0])]
    return values


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _envelope(kind: str, request: web.Request, data: list[dict], tokens: list[int]) -> dict[str, Any]:
    usage = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens), "completion_tokens": 0, "prompt_tokens_details": None}
    name = request.app[OPTIONS].model_name
    return {"id": f"{kind}-{uuid.uuid4().hex}", "object": "list", "created": now(), "model": name, "data": data, "usage": usage}


async def _vllm_scores(request: web.Request, body: dict[str, Any]) -> tuple[list[Score], list[int]]:
    for key, instead in REMOVED.items():
        if key in body:
            raise bad_request(f"Parameter `{key}` was removed; use `{instead}` instead.")
    if "input" in body and "messages" in body:
        raise bad_request("body: send `input` or `messages`, not both")
    keep_last = _keep_last(body)
    if "messages" in body:
        if body.get("add_generation_prompt") or body.get("continue_final_message"):
            raise bad_request("messages: the conversation is scored as it is; it must end with the assistant turn to score")
        try:
            item = conversation_inputs(body["messages"], keep_last)
        except InvalidConversationError as exc:
            raise bad_request(f"messages: {exc}", "invalid") from None
        return await score_items(request, [item], "messages", indexed=False)
    special = optional(body, "add_special_tokens", bool, True)
    texts = _inputs(body["input"], "input")
    items = request_items(
        texts, lambda _, x: token_inputs(x, keep_last) if isinstance(x, list) else text_inputs(x, special, keep_last), "input"
    )
    return await score_items(request, items, "input")


def _keep_last(body: dict[str, Any]) -> int:
    """KEEP_LAST_TOKENS from vLLM's truncate_prompt_tokens and truncation_side (left only)."""
    limit = optional(body, "truncate_prompt_tokens", int)
    side = body.get("truncation_side")
    if side not in (None, "left", "right"):
        raise bad_request(f"truncation_side: {side!r} is not 'left' or 'right'")
    if limit is None:
        return 0
    if side == "right":
        raise bad_request("truncation_side: 'right' would cut the end, where the reward is read; use 'left' (the default here)")
    if limit == -1:
        return NO_LIMIT
    if limit < 1:
        raise bad_request(f"truncate_prompt_tokens: {limit} is not -1 or a positive number of tokens")
    return limit


def _inputs(value: Any, key: str) -> list[str | list[int]]:
    """vLLM's (and SGLang's) one-or-many inputs: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(_is_id(x) for x in value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return value
    if isinstance(value, list) and value and all(isinstance(x, list) and x and all(_is_id(t) for t in x) for x in value):
        return value
    raise bad_request(f"{key}: expected a string, a list of strings, token ids or a list of token-id lists (none empty)")


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def sglang_error(exc: GatewayError) -> dict[str, Any]:
    return {"error": {"message": str(exc)}}


async def sglang_classify(request: web.Request, body: dict[str, Any]) -> web.Response:
    if "text" in body and "input_ids" in body:
        raise bad_request("body: send `text` or `input_ids`, not both")
    key = "text" if "text" in body else "input_ids"
    value = body[key]
    if key == "input_ids" and isinstance(value, str):
        raise GatewayError(400, "input_ids: expected token ids", "malformed")
    inputs = _inputs(value, key)
    if key == "text" and not all(isinstance(x, str) for x in inputs):
        raise bad_request("text: expected a string or a list of strings (pairs of strings are for cross-encoders, not served)")
    single = isinstance(value, str) or (key == "input_ids" and all(_is_id(x) for x in value))
    start = time.perf_counter()
    items = request_items(inputs, lambda _, x: text_inputs(x) if isinstance(x, str) else token_inputs(x), key)
    scores, tokens = await score_items(request, items, key, indexed=not single)
    latency = time.perf_counter() - start
    answers = [
        {
            "embedding": list(score.attributes.values()),
            "meta_info": {
                "id": uuid.uuid4().hex,
                "finish_reason": {"type": "length", "length": 0},
                "prompt_tokens": n,
                "weight_version": "default",
                "e2e_latency": latency,
            },
        }
        for score, n in zip(scores, tokens, strict=True)
    ]
    return web.json_response(answers[0] if single else answers)
