"""A NeMo-Aligner-style checkpoint served end to end: SteerLM prompt format, a 9-attribute head with
bias, and NeMo-Aligner's reward-server protocol spoken through pytriton's clients, as its own
attribute_annotate.py (FuturesModelClient, `sentences`) and RemoteGPTRMClient (`tokens` +
`sequence_lengths`) do.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from pytriton.client import FuturesModelClient, ModelClient
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from reward_client import InvalidConversationError, RewardClient
from tests.live_server import REPO

ATTRIBUTES = ["quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence", "complexity", "verbosity"]
TOLERANCE = 1e-4

# NeMo-Aligner's examples/nlp/data/steerlm/common.py, written out here to check the template against.
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYSTEM_PROMPT_TEMPLATE = "<extra_id_0>System\n{value}\n"
USER_TURN_TEMPLATE = "<extra_id_1>User\n{value}\n"
ASSISTANT_TURN_TEMPLATE = "<extra_id_1>Assistant\n{value}\n"
LABEL_PREFIX = "<extra_id_2>"

RECORD = {
    "system": SYSTEM_PROMPT,
    "mask": "User",
    "conversations": [
        {"from": "User", "value": "Name a prime number.", "label": None},
        {"from": "Assistant", "value": "7 is prime.", "label": "helpfulness:4"},
        {"from": "User", "value": "And an even one?", "label": None},
        {"from": "Assistant", "value": "2 is the only even prime.", "label": "helpfulness:4"},
    ],
}


def nemo_texts(record) -> list[str]:
    """attribute_annotate.py's loop: the text sent for every labelled turn."""
    text, out = SYSTEM_PROMPT_TEMPLATE.format(value=SYSTEM_PROMPT), []
    for turn in record["conversations"]:
        template = USER_TURN_TEMPLATE if turn["from"] == record["mask"] else ASSISTANT_TURN_TEMPLATE
        text += template.format(value=turn["value"])
        if turn.get("label") is not None:
            out.append(text + LABEL_PREFIX)
    return out


@pytest.fixture(scope="module")
def steerlm_tokenizer(steerlm):
    return AutoTokenizer.from_pretrained(steerlm)


@pytest.fixture(scope="module")
def reference_attributes(steerlm):
    """transformers trunk (eager, fp32), last hidden state at the last token, @ W.T + b."""
    trunk = AutoModel.from_pretrained(steerlm, dtype=torch.float32, attn_implementation="eager").eval()
    head = load_file(steerlm / "reward_head.safetensors")

    @torch.inference_mode()
    def attributes(ids) -> np.ndarray:
        hidden = trunk(torch.tensor([ids])).last_hidden_state[0, -1]
        return (hidden @ head["weight"].T + head["bias"]).numpy()

    return attributes


@pytest.fixture(scope="module")
def steerlm_server(tmp_path_factory, steerlm):
    """The repository served with the SteerLM checkpoint, plus a copy of the NeMo model that merges attributes."""
    from tests.live_server import start_server, stop_server

    repository = tmp_path_factory.mktemp("repository")
    for model in ("preprocessing", "reward_engine", "reward_model", "nemo_reward_model"):
        shutil.copytree(REPO / "model_repository" / model, repository / model)
    merged = repository / "nemo_reward_model_merged"
    shutil.copytree(REPO / "model_repository" / "nemo_reward_model", merged)
    config = (merged / "config.pbtxt").read_text().replace('name: "nemo_reward_model"', 'name: "nemo_reward_model_merged"')
    (merged / "config.pbtxt").write_text(config + 'parameters [ { key: "merge_attributes", value: { string_value: "true" } } ]\n')
    try:
        server = start_server(
            tmp_path_factory.mktemp("tritonserver") / "server.log",
            model_repository=repository,
            env={"REWARD_CHECKPOINT": str(steerlm)},
        )
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    stop_server(server)


def test_template_renders_nemo_aligner_text(steerlm_tokenizer):
    """The checkpoint's chat template gives exactly the text attribute_annotate.py sends for the last turn."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    messages += [{"role": t["from"].lower(), "content": t["value"]} for t in RECORD["conversations"]]
    assert steerlm_tokenizer.apply_chat_template(messages, tokenize=False) == nemo_texts(RECORD)[-1]
    no_system = steerlm_tokenizer.apply_chat_template(messages[1:], tokenize=False)
    assert no_system == nemo_texts(RECORD)[-1]  # NeMo-Aligner's default system prompt


def test_ensemble_returns_named_attributes(steerlm_server, steerlm_tokenizer, reference_attributes):
    with RewardClient(steerlm_server.grpc_url) as client:
        score = client.score(RECORD)
    expected = reference_attributes(steerlm_tokenizer(nemo_texts(RECORD)[-1], add_special_tokens=False).input_ids)
    assert list(score.attributes) == ATTRIBUTES
    assert np.abs(np.array(list(score.attributes.values())) - expected).max() <= TOLERANCE
    assert float(score) == pytest.approx(score.attributes["helpfulness"], abs=1e-6)  # reward = index 4
    assert np.std(expected) > 0.1  # the attributes really differ


def test_per_turn_scores_refuse_a_template_that_is_not_prefix_stable(steerlm_server):
    with RewardClient(steerlm_server.http_url) as client, pytest.raises(InvalidConversationError, match="prefix"):
        client.score_turns(RECORD)


@pytest.mark.parametrize("add_eos", [False, True])
def test_annotate_flow_through_futures_model_client(steerlm_server, steerlm_tokenizer, reference_attributes, add_eos):
    """attribute_annotate.py's get_reward(): one `sentences` row per request (with its `add_EOS`
    flag), `rewards` and `exceeded` read back."""
    texts = nemo_texts(RECORD)
    sentences = np.char.encode(np.array(texts)[..., np.newaxis], "utf-8")
    with FuturesModelClient(steerlm_server.http_url.removeprefix("http://"), "nemo_reward_model") as client:
        futures = [
            client.infer_batch(sentences=sen, add_EOS=np.ones_like(sen, dtype=bool) * add_eos) for sen in np.split(sentences, len(texts))
        ]
        results = [future.result() for future in futures]
    for text, result in zip(texts, results, strict=True):
        ids = steerlm_tokenizer(text, add_special_tokens=False).input_ids + [steerlm_tokenizer.eos_token_id] * add_eos
        expected = reference_attributes(ids)
        assert result["rewards"].shape == (1, 9)
        assert np.abs(result["rewards"][0] - expected).max() <= TOLERANCE
        assert result["exceeded"].tolist() == [[False]]


def test_tokens_and_sequence_lengths_like_remote_rm_client(steerlm_server, steerlm_tokenizer, reference_attributes):
    """RemoteGPTRMClient sends right-padded token ids with their lengths, a whole batch at once."""
    short = SYSTEM_PROMPT_TEMPLATE.format(value="x") + USER_TURN_TEMPLATE.format(value="hi") + LABEL_PREFIX
    texts = [*nemo_texts(RECORD), short]
    rows = [steerlm_tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    tokens = np.zeros((len(rows), max(map(len, rows)) + 5), dtype=np.int64)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    lengths = np.array([[len(r)] for r in rows], dtype=np.int64)
    with ModelClient(steerlm_server.http_url, "nemo_reward_model") as client:
        result = client.infer_batch(tokens=tokens, sequence_lengths=lengths)
    with ModelClient(f"grpc://{steerlm_server.grpc_url}", "nemo_reward_model_merged") as client:
        merged = client.infer_batch(tokens=tokens, sequence_lengths=lengths)
    expected = np.stack([reference_attributes(r) for r in rows])
    assert np.abs(result["rewards"] - expected).max() <= TOLERANCE
    assert merged["rewards"].shape == (len(rows), 1)
    assert np.abs(merged["rewards"][:, 0] - expected[:, 4]).max() <= TOLERANCE


def test_overlong_rows_are_flagged_and_scored_on_their_head(steerlm_server, steerlm_tokenizer, reference_attributes):
    text = nemo_texts(RECORD)[0] + "word " * 5000
    ids = steerlm_tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > 4096
    with ModelClient(steerlm_server.http_url, "nemo_reward_model") as client:
        result = client.infer_batch(sentences=np.array([[text.encode()], [nemo_texts(RECORD)[0].encode()]], dtype=np.object_))
    assert result["exceeded"].tolist() == [[True], [False]]
    assert np.abs(result["rewards"][0] - reference_attributes(ids[:4096])).max() <= TOLERANCE


def test_protocol_errors_name_the_problem(steerlm_server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(steerlm_server.http_url.removeprefix("http://"))
    tokens = httpclient.InferInput("tokens", [1, 3], "INT64")
    tokens.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="sequence_lengths"):
        client.infer("nemo_reward_model", [tokens])
    bad = httpclient.InferInput("tokens", [1, 3], "INT64")
    bad.set_data_from_numpy(np.array([[1, 2, 10**9]], dtype=np.int64))
    lengths = httpclient.InferInput("sequence_lengths", [1, 1], "INT64")
    lengths.set_data_from_numpy(np.array([[3]], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="ids must lie in"):
        client.infer("nemo_reward_model", [bad, lengths])
    assert client.is_model_ready("nemo_reward_model")
    client.close()
