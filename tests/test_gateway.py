"""The RLHF gateway (reward_server.gateway) in the front's aiohttp app, against the live ensemble:
every route answers in its origin's wire shape with the ensemble's own scores; the ensemble's new
inputs (TEXT, TOKENS, ADD_SPECIAL_TOKENS, KEEP_LAST_TOKENS) through the client; keys; metrics."""

from __future__ import annotations

import json
import math
import os
import signal
import ssl

import numpy as np
import pytest
import requests
from prometheus_client import CollectorRegistry

from reward_client import AsyncRewardClient, InvalidConversationError, RewardClient, protocol
from reward_server import gateway
from reward_server.launcher import front
from tests.corpus import conversations
from tests.live_server import BackgroundLoop, free_port

MESSAGES = [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "1+1=2"}]
LONG = [
    {"role": "system", "content": "Answer briefly."},
    *[
        m
        for k in range(6)
        for m in ({"role": "user", "content": f"Question {k}: " + "why? " * 40}, {"role": "assistant", "content": "Because."})
    ],
]


class Running(BackgroundLoop):
    """The front's app with the gateway installed, served on a free port from a thread of its own."""

    def __init__(self, server, **options) -> None:
        super().__init__()
        self.registry = CollectorRegistry()
        opts = gateway.Options(registry=self.registry, max_tokens=4096, **options)
        hook = lambda app: gateway.install(app, lambda: AsyncRewardClient(server.grpc_url), opts)  # noqa: E731
        app = front.application(server.http_url, admin_key=None, install=[hook])
        self.url = f"http://127.0.0.1:{free_port()}"
        self.runner = self.call(front.start(app, "127.0.0.1", int(self.url.rsplit(":", 1)[1])))

    def post(self, path: str, body, **headers) -> requests.Response:
        return requests.post(self.url + path, json=body, headers=headers, timeout=120)

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.call(self.runner.cleanup())
        self.stop_loop()


@pytest.fixture(scope="module")
def gw(server):
    running = Running(server)
    yield running
    running.close()


@pytest.fixture(scope="module")
def grpc(server):
    with RewardClient(server.grpc_url) as client:
        yield client


def test_the_ensemble_scores_text_and_tokens_as_the_conversation_they_render(grpc, tokenizer):
    """TEXT (with its BOS once: written in the text, or added) and TOKENS give the conversation's own score."""
    for messages in conversations()[:6]:
        expected = grpc.score(messages)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        bos = tokenizer.bos_token
        assert text.startswith(bos)
        assert grpc.score_text(text) == expected == grpc.score_text(text.removeprefix(bos))
        assert grpc.score_tokens(ids) == expected
        assert grpc.score_text(text, add_special_tokens=False) == expected
        assert grpc.score_text(text.removeprefix(bos), add_special_tokens=False) != expected  # no BOS at all: another text


def test_keep_last_tokens_cuts_whole_earliest_exchanges_and_never_the_scored_turn(grpc, tokenizer):
    full = tokenizer.apply_chat_template(LONG, tokenize=True, return_dict=False)
    cut = [LONG[0], *LONG[-4:]]  # the system turn and the last two exchanges
    size = len(tokenizer.apply_chat_template(cut, tokenize=True, return_dict=False))
    scores, tokens = grpc.score_tensors(
        {
            protocol.CONVERSATION: np.array([[json.dumps(LONG).encode()]], dtype=np.object_),
            protocol.KEEP_LAST_TOKENS: np.array([[size + 10]], dtype=np.int32),
        }
    )
    assert tokens == [size] and scores[0] == grpc.score(cut) and size < len(full)
    assert grpc.score_tokens(full, keep_last_tokens=50) == grpc.score_tokens(full[-50:])
    with pytest.raises(InvalidConversationError, match=r"its last exchange alone is \d+ tokens, over the limit of 5 tokens"):
        grpc.score_tensors(
            {
                protocol.CONVERSATION: np.array(
                    [[b'[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]']], dtype=np.object_
                ),
                protocol.KEEP_LAST_TOKENS: np.array([[5]], dtype=np.int32),
            }
        )


def test_the_ensemble_refuses_mixed_or_missing_inputs(grpc):
    text = np.array([[b"hello"]], dtype=np.object_)
    with pytest.raises(InvalidConversationError, match="exactly one of CONVERSATION, TEXT, TOKENS; got CONVERSATION, TEXT"):
        grpc.score_tensors({protocol.CONVERSATION: text, protocol.TEXT: text})
    with pytest.raises(InvalidConversationError, match="SCORE_TURNS needs CONVERSATION"):
        grpc.score_tensors({protocol.TEXT: text, protocol.SCORE_TURNS: np.array([[True]])})
    with pytest.raises(InvalidConversationError, match=r"token ids must lie in \[0, "):
        grpc.score_tokens([1, 2, 10**9])
    with pytest.raises(InvalidConversationError, match="-1 pads the end of a row only"):
        grpc.score_tensors({protocol.TOKENS: np.array([[1, -1, 2]], dtype=np.int32)})


def test_get_reward_parses_the_policys_template_and_scores_with_the_reward_models(gw, grpc, tokenizer, steerlm):
    """OpenRLHF's exact payload (agent.py, v0.11.2): one query per POST or a batch; Llama 3 and
    SteerLM texts are scored as their conversations, in the reward model's template."""
    from transformers import AutoTokenizer

    steer = AutoTokenizer.from_pretrained(steerlm)
    cases = conversations()[:5]
    expected = [float(grpc.score(c)) for c in cases]
    queries = [tokenizer.apply_chat_template(c, tokenize=False) for c in cases]
    prompts = [tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in cases]
    answer = gw.post("/get_reward", {"query": queries, "prompts": prompts, "labels": [""] * len(cases)})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"rewards": expected, "scores": expected, "extra_logs": {"dummy_scores": expected}}
    steered = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    single = gw.post("/get_reward", {"query": [steer.apply_chat_template(steered, tokenize=False)], "prompts": [""], "labels": [""]})
    assert single.json()["rewards"] == [float(grpc.score(steered))]


def test_get_reward_refuses_unknown_formats_unless_raw(gw, grpc, tokenizer):
    text = "User: what is 1+1?\nAssistant: 2"
    queries = [tokenizer.apply_chat_template(MESSAGES, tokenize=False), text]
    refused = gw.post("/get_reward", {"query": queries})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"].startswith("query[1]: in no known chat format")
    before = gw.metric("reward_gateway_errors_total", route="/get_reward", reason="format")
    assert before >= 1
    raw = gw.post("/get_reward", {"query": queries, "raw": True})
    assert raw.json()["rewards"] == [float(grpc.score(MESSAGES)), float(grpc.score_text(text))]
    bad = gw.post(
        "/get_reward", {"query": [queries[0], queries[0].replace("assistant", "user", 1)]}
    )  # parses; last turn not the assistant's
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("query[1]: read as llama3 chat format: ")


def test_vllm_classify_and_pooling_as_verl_reads_them(gw, grpc, tokenizer):
    """verl (reward_loop.py): the reward model's template, BOS stripped (vLLM adds it), use_activation
    false, reads data[-1].probs[-1]; the default applies vLLM's sigmoid to one-label heads."""
    expected = float(grpc.score(MESSAGES))
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False).removeprefix(tokenizer.bos_token)
    body = {"model": "/models/any/hf/path", "input": text, "use_activation": False}
    out = gw.post("/classify", body).json()
    assert out["data"][-1]["probs"][-1] == expected
    assert out["object"] == "list" and out["id"].startswith("classify-") and out["model"] == protocol.ENSEMBLE_MODEL
    assert out["data"] == [{"index": 0, "label": "reward", "probs": [expected], "num_classes": 1}]
    tokens = len(tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=False))
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None}
    sigmoid = gw.post("/classify", {"input": [text, text]}).json()["data"]
    assert [d["probs"][0] for d in sigmoid] == [pytest.approx(1 / (1 + math.exp(-expected)), abs=1e-12)] * 2
    assert gw.post("/classify", {"input": text, "activation": False}).json()["data"][0]["probs"] == [expected]  # verl v0.7.0
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=False)
    assert gw.post("/classify", {"input": [ids], "use_activation": False}).json()["data"][0]["probs"] == [expected]
    assert gw.post("/classify", {"messages": MESSAGES, "use_activation": False}).json()["data"][0]["probs"] == [expected]
    pooled = gw.post("/pooling", {"input": text, "task": "classify", "use_activation": False}).json()
    assert pooled["data"] == [{"index": 0, "object": "pooling", "data": [expected]}] and pooled["id"].startswith("pool-")


def test_vllm_truncation_is_left_only_and_keeps_the_scored_turn(gw, grpc, tokenizer):
    full = tokenizer.apply_chat_template(LONG, tokenize=True, return_dict=False)
    body = {"input": [full], "truncate_prompt_tokens": 64, "truncation_side": "left", "use_activation": False}
    assert gw.post("/classify", body).json()["data"][0]["probs"] == [float(grpc.score_tokens(full[-64:]))]
    cut = [LONG[0], *LONG[-2:]]
    size = len(tokenizer.apply_chat_template(cut, tokenize=True, return_dict=False))
    answer = gw.post("/classify", {"messages": LONG, "truncate_prompt_tokens": size, "use_activation": False}).json()
    assert answer["data"][0]["probs"] == [float(grpc.score(cut))] and answer["usage"]["prompt_tokens"] == size
    right = gw.post("/classify", {**body, "truncation_side": "right"})
    assert right.status_code == 400 and "'right' would cut the end" in right.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"input": ["ok", 3]}, "input: expected a string"),
        ({"input": "x", "normalize": True}, "Parameter `normalize` was removed; use `use_activation` instead."),
        ({"input": "x", "text": "y"}, "exactly one kind"),
        ({}, "exactly one kind (got none)"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages: conversation: the last turn must be the assistant's"),
        ({"input": ["fine", "x" * 70000]}, "input[1]: text: "),
        # numpy's int32 cast used to wrap these: another input scored, 200
        ({"input": [1, 2, 2**32 + 5]}, "input[0]: tokens: token ids must be integers in [0, 2147483647]"),
        ({"input": [[1, 2, -1]]}, "input[0]: tokens: token ids must be integers"),  # -1 would have been read as padding
        ({"input": "x", "truncate_prompt_tokens": 2**32 + 5}, "input[0]: keep_last_tokens: 4294967301 is not between 0 and"),
        ({"input": ["x"] * 4097}, "input: 4097 items is over the limit of 4096 per request"),
    ],
)
def test_vllm_refusals_name_the_item_and_the_problem(gw, body, problem):
    answer = gw.post("/classify", body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert problem in error["message"] and error["code"] == 400 and error["type"] == "BadRequestError"


def test_a_body_no_json_parser_takes_is_a_400_not_a_500(gw):
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"input": ' + b"1" * 5000 + b"}"):  # too deep; an int of 5,000 digits
        answer = requests.post(gw.url + "/classify", data=body, timeout=60)
        assert answer.status_code == 400 and "body: not valid JSON" in answer.json()["error"]["message"]


def test_openai_fields_that_say_nothing_of_the_text_are_dropped(gw):
    """`name` (also beside content parts) and the null fields of an SDK's assistant reply (refusal, tool_calls):
    the same score as without them (they were refused as unknown keys)."""
    plain = gw.post("/v1/chat/completions", {"model": "m", "messages": MESSAGES}).json()["choices"][0]["message"]["content"]
    user, assistant = MESSAGES
    messages = [
        {**user, "content": [{"type": "text", "text": user["content"]}], "name": "bob"},
        {**assistant, "refusal": None, "tool_calls": None, "function_call": None, "audio": None},
    ]
    answer = gw.post("/v1/chat/completions", {"model": "m", "messages": messages})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == plain
    used = gw.post("/v1/chat/completions", {"model": "m", "messages": [user, {**assistant, "tool_calls": [{"id": "x"}]}]})
    assert used.status_code == 400 and "tool_calls" in used.json()["error"]["message"]


def test_sglang_classify_answers_bare_embeddings(gw, grpc, tokenizer):
    expected = float(grpc.score(MESSAGES))
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    one = gw.post("/classify", {"text": text}).json()
    assert one["embedding"] == [expected] and one["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=False)
    assert one["meta_info"]["prompt_tokens"] == len(ids)
    batch = gw.post("/classify", {"text": [text, text]}).json()
    assert [b["embedding"] for b in batch] == [[expected]] * 2
    assert gw.post("/classify", {"input_ids": ids}).json()["embedding"] == [expected]
    first, second = gw.post("/classify", {"input_ids": [ids, ids[:-1]]}).json()
    assert first["embedding"] == [expected] and second["meta_info"]["prompt_tokens"] == len(ids) - 1
    refused = gw.post("/classify", {"input_ids": [ids, [10**9]]})
    assert refused.status_code == 400 and refused.json()["error"]["message"].startswith("input_ids[1]: tokens: token ids must lie")


def test_openai_chat_completions_with_the_openai_package(gw, grpc, tokenizer):
    import openai

    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    completion = client.chat.completions.create(model="nvidia/llama-3.1-nemotron-70b-reward", messages=MESSAGES)
    score = grpc.score(MESSAGES)
    assert completion.choices[0].message.content == f"reward:{float(score)!r}"
    assert {t.token: t.logprob for t in completion.choices[0].logprobs.content} == {"reward": float(score)}  # NeMo-Curator's read
    assert completion.choices[0].finish_reason == "length"
    tokens = len(tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=False))
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (tokens, 1)
    assert [m.id for m in client.models.list()] == [protocol.ENSEMBLE_MODEL]
    with pytest.raises(openai.BadRequestError, match="the last turn must be the assistant's"):
        client.chat.completions.create(model="m", messages=MESSAGES[:1])


def test_the_launcher_serves_the_gateway_behind_keys_on_http_and_grpc(tmp_path_factory, steerlm, certificates):
    """`reward-server --api-key-file` (two keys) with TLS, on the SteerLM checkpoint: the front's routes
    and gRPC (the gRPC front, before Triton's gRPC on loopback) take either key and refuse others (health
    open); N attributes are "name:value,..." with one logprobs entry each, in the head's order; the
    metrics port carries the gateway's and the gRPC front's metrics; no key in any process's command
    line or environment; a keyed client with default settings rides out a restart of tritonserver."""
    import openai

    from reward_client import TLS, PermissionDeniedError
    from tests.live_server import session_processes, start_server, stop_server

    folder = tmp_path_factory.mktemp("gateway-launcher")
    (folder / "api-keys").write_text("# trainers\nlauncher-key\n\nsecond-key\n")
    options = ["--api-key-file", str(folder / "api-keys"), "--tls-cert", str(certificates / "server.pem")]
    options += ["--tls-key", str(certificates / "server.key")]
    env = {"REWARD_CHECKPOINT": str(steerlm)}
    server = start_server(folder / "server.log", env=env, options=options, ca_file=certificates / "ca.pem")
    ca, tls = str(certificates / "ca.pem"), TLS(ca_file=str(certificates / "ca.pem"))
    try:
        with RewardClient(server.grpc_url, tls=tls, headers={"Authorization": "Bearer launcher-key"}) as keyed:
            score = keyed.score(MESSAGES)
        with RewardClient(server.grpc_url, tls=tls, headers={"Authorization": "Bearer second-key"}) as second:
            assert second.score(MESSAGES) == score
        with RewardClient(server.grpc_url, tls=tls) as keyless:
            assert keyless.is_ready()
            with pytest.raises(PermissionDeniedError, match="Unauthorized"):
                keyless.score(MESSAGES)
        assert requests.post(server.http_url + "/get_reward", json={"query": ["x"]}, verify=ca, timeout=60).status_code == 401
        trusted = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca))
        client = openai.OpenAI(base_url=server.http_url + "/v1", api_key="second-key", http_client=trusted)
        completion = client.chat.completions.create(model="m", messages=MESSAGES)
        assert len(score.attributes) == 9
        assert completion.choices[0].message.content == ",".join(f"{k}:{v!r}" for k, v in score.attributes.items())
        assert [(t.token, t.logprob) for t in completion.choices[0].logprobs.content] == list(score.attributes.items())
        headers = {"Authorization": "Bearer launcher-key"}
        classify = requests.post(server.http_url + "/classify", json={"input": "x"}, headers=headers, verify=ca, timeout=60).json()
        assert classify["data"][0]["num_classes"] == 9  # a multi-attribute head is answered as it is
        assert requests.get(server.http_url + "/v2/health/ready", verify=ca, timeout=30).status_code == 200
        metrics = requests.get(server.metrics_url, timeout=30).text
        assert 'reward_gateway_requests_total{route="/v1/chat/completions"} 1.0' in metrics
        assert 'reward_grpc_requests_total{code="OK",method="ModelInfer"} 2.0' in metrics
        assert 'reward_grpc_requests_total{code="UNAUTHENTICATED",method="ModelInfer"} 1.0' in metrics
        assert "launcher-key" not in metrics and "launcher-key" not in server.log.read_text()
        processes = session_processes(server)
        assert not any(b"launcher-key" in command or b"launcher-key" in environment for command, environment in processes.values())
        (triton,) = [pid for pid, (command, _) in processes.items() if b"--grpc-address=127.0.0.1" in command]
        os.kill(triton, signal.SIGKILL)  # the supervisor restarts it; meanwhile the gRPC front answers UNAVAILABLE
        with RewardClient(server.grpc_url, tls=tls, headers={"Authorization": "Bearer second-key"}) as keyed:
            assert keyed.score(MESSAGES) == score
        assert "tritonserver exited with -9; restart 1" in server.log.read_text()
    finally:
        stop_server(server)


def test_bearer_keys_guard_every_route_but_health(server, grpc):
    import openai

    running = Running(server, api_keys=("key-one", "key-two"))
    try:
        for path in ("/get_reward", "/classify", "/pooling", "/v1/chat/completions", f"/v2/models/{protocol.ENSEMBLE_MODEL}/infer"):
            refused = running.post(path, {}, Authorization="Bearer wrong")
            assert (refused.status_code, refused.json()) == (401, {"error": "Unauthorized"}), path
        assert requests.get(running.url + "/v1/models", timeout=30).status_code == 401
        assert requests.get(running.url + "/v2/health/ready", timeout=30).status_code == 200
        assert running.post("/classify", {"input": "x"}, Authorization="bearer key-two").status_code == 200
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="key-one")
        assert client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content.startswith("reward:")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "/v1", api_key="key-three").models.list()
        assert running.metric("reward_gateway_errors_total", route="/classify", reason="unauthorized") == 1
    finally:
        running.close()


def test_per_route_metrics(gw):
    before = gw.metric("reward_gateway_requests_total", route="/pooling")
    errors = gw.metric("reward_gateway_errors_total", route="/pooling", reason="malformed")
    assert gw.post("/pooling", {"input": "x", "task": "embed"}).status_code == 400
    assert gw.post("/pooling", {"input": "x"}).status_code == 200
    assert gw.metric("reward_gateway_requests_total", route="/pooling") == before + 2
    assert gw.metric("reward_gateway_errors_total", route="/pooling", reason="malformed") == errors + 1
    assert gw.metric("reward_gateway_request_duration_seconds_count", route="/pooling") == before + 2


def test_get_reward_normalizes_as_openrlhfs_normalize_reward(server, grpc, tokenizer, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"normalize_reward": True, "mean": 0.5, "std": 2.0}))
    assert gateway.checkpoint_normalization(tmp_path) == (0.5, 2.0)
    (tmp_path / "config.json").write_text(json.dumps({"mean": 0.5, "std": 2.0}))  # trained without it: not applied
    assert gateway.checkpoint_normalization(tmp_path) is None
    running = Running(server, normalize=(0.5, 2.0))
    try:
        answer = running.post("/get_reward", {"query": [tokenizer.apply_chat_template(MESSAGES, tokenize=False)]}).json()
        assert answer["rewards"] == [(float(grpc.score(MESSAGES)) - 0.5) / 2.0]
    finally:
        running.close()


def test_a_key_header_that_is_not_utf8_is_a_wrong_key():
    """aiohttp hands such bytes over as surrogates; hashing them failed with a 500 instead of a 401."""
    from reward_server.gateway.auth import ApiKeys

    keys = ApiKeys(["k"])
    assert keys.accept("Bearer k") and not keys.accept("Bearer \udcff\udcfe")
