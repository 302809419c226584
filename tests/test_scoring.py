"""The engine model's request logic (scoring.answers), with a real engine on the demo checkpoint:
each request is answered by the step that scores its last row, with the bits it gets scored alone, and only the
answers of the batch's last step say so (the engine model returns those in execute's list, one message to
Triton, and sends the earlier ones at once); whatever fails, each request gets exactly one answer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reward_client import protocol
from reward_server.errors import RequestError
from reward_server.inputs import Inputs, leading_special_tokens
from reward_server.runtimes.torch_runtime import TorchRewardEngine
from reward_server.scoring import Rows, answers, request_rows
from reward_server.templating import ChatTokenizer


class Failing:
    """The engine, failing before its step number `step` (1-based; 0: in `plan`), outside the step (reading its
    cache counters, as run_steps does before each step: ValueError) or inside it (`inside`: RuntimeError)."""

    def __init__(self, engine: TorchRewardEngine, step: int, inside: bool = False) -> None:
        self.engine, self.step, self.inside, self.steps = engine, step, inside, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def plan(self, *args, **kwargs):
        if self.step == 0:
            raise ValueError("planning fails")
        return self.engine.plan(*args, **kwargs)

    @property
    def cache_counters(self):
        self.steps += 1
        if self.steps == self.step and not self.inside:
            raise ValueError("counting fails")
        return self.engine.cache_counters

    def score_step(self, *args, **kwargs):
        if self.steps == self.step and self.inside:
            raise RuntimeError("this step fails")
        return self.engine.score_step(*args, **kwargs)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return TorchRewardEngine(str(checkpoint), device="cpu", max_step_tokens=256)


@pytest.fixture(scope="module")
def inputs(checkpoint):
    return Inputs(ChatTokenizer(str(checkpoint), max_tokens=4096))


@pytest.fixture(scope="module")
def batch():
    """Rows of 40, 200 + 50, 240 and 230 tokens, and a refused request (None): steps of 256 tokens, shortest
    first, are [40, 50], [200], [230], [240]."""
    rng = np.random.default_rng(7)
    row = lambda n: rng.integers(0, 128_000, n)  # noqa: E731
    rows = [[row(40)], [row(200), row(50)], [row(240)], None, [row(230)]]
    return [None if r is None else Rows(r, [np.array([len(s) - 1]) for s in r]) for r in rows]


def run(engine, batch) -> list[tuple[int, object]]:
    """(steps run so far, answer) for each answer, in the order they come."""
    steps = []
    return [(len(steps), answer) for answer in answers(engine, batch, lambda result, lengths: steps.append(lengths))]


def test_a_request_is_answered_by_the_step_of_its_last_row_and_only_the_last_steps_answers_say_last(engine, batch):
    got = run(engine, batch)
    assert [(step, a.request, a.last_step) for step, a in got] == [(1, 0, False), (2, 1, False), (3, 4, False), (4, 2, True)]
    for _, answer in got:
        rows = batch[answer.request].ids
        alone = np.stack([engine.score([row])[0] for row in rows])  # bit-for-bit batch invariance
        np.testing.assert_array_equal(answer.outputs[protocol.ATTRIBUTES], alone)


@pytest.mark.parametrize(("fails", "failed", "last"), [(2, 1, False), (4, 2, True)])  # failed: the request of that step's row
def test_a_failed_step_fails_its_requests_alone_and_says_whether_it_was_the_last(engine, batch, fails, failed, last):
    got = {a.request: a for _, a in run(Failing(engine, fails, inside=True), batch)}
    assert sorted(got) == [0, 1, 2, 4]  # every request answered once; the refused one is not the engine's
    assert got[failed].error is not None and "RuntimeError" in str(got[failed].error) and got[failed].last_step is last
    assert all(a.error is None and a.outputs is not None for r, a in got.items() if r != failed)


@pytest.mark.parametrize(("fails", "scored"), [(0, []), (2, [0])])  # in the plan; before the second step (after the first's)
def test_a_failure_outside_the_steps_answers_every_request_not_answered_yet(engine, batch, fails, scored):
    got = list(answers(Failing(engine, fails), batch))
    assert sorted(a.request for a in got) == [0, 1, 2, 4]  # each once; the refused request (None) is not the engine's
    for answer in got:
        if answer.request in scored:
            assert answer.error is None and answer.outputs is not None
        else:
            assert answer.outputs is None and str(answer.error) == "reward engine failed: ValueError"
            assert isinstance(answer.error.__cause__, ValueError) and answer.last_step


@pytest.mark.parametrize(
    ("score_at", "refused"),
    [
        ([[4, 9, -1, -1]], False),
        ([[9]], False),
        ([[-7, 4, 9]], True),  # a negative that is no padding: the columns would no longer be the client's
        ([[2, -1, 9]], True),
        ([[-1, -1, 9]], True),
        ([[4, 9, -2]], True),
    ],
)
def test_score_at_takes_minus_one_as_trailing_padding_only(engine, score_at, refused):
    ids, lengths = np.arange(1, 11, dtype=np.int32)[None], np.array([[10]], dtype=np.int32)
    if refused:
        with pytest.raises(RequestError, match="then -1 padding"):
            request_rows(engine, 4096, ids, lengths, np.array(score_at, dtype=np.int32))
    else:
        expected = [p for p in score_at[0] if p >= 0]
        assert request_rows(engine, 4096, ids, lengths, np.array(score_at, dtype=np.int32)).reads[0].tolist() == expected


def test_a_request_of_no_rows_is_refused_not_left_unanswered(engine, inputs):
    """It owned no row, so no step answered it: the scoring thread never sent it anything."""
    with pytest.raises(RequestError, match="rows >= 1") as caught:
        request_rows(engine, 4096, np.zeros((0, 5), dtype=np.int32), np.zeros((0, 1), dtype=np.int32), None)
    assert caught.value.reason == "tensors"
    for source in (protocol.CONVERSATION, protocol.TEXT):
        (refused,) = inputs.encode_requests([{source: np.zeros((0, 1), dtype=np.object_)}])  # was a ValueError: INTERNAL
        assert isinstance(refused, RequestError) and refused.reason == "tensors"


def test_a_text_that_writes_its_bos_keeps_it_first_when_cut(inputs):
    """TEXT with its BOS written out and TEXT without it are one text, cut from the left or not (the cut
    used to drop a written-out BOS: another row, another score)."""
    body = "<|start_header_id|>user<|end_header_id|>\n\nhello there, how are you<|eot_id|>"
    bos = inputs.chat.tokenizer.bos_token
    for keep in (0, 8):
        cut = {protocol.KEEP_LAST_TOKENS: np.array([[keep]])}
        rows = [inputs.encode({protocol.TEXT: np.array([[text.encode()]], dtype=np.object_), **cut})[0][0] for text in (body, bos + body)]
        assert rows[0].tolist() == rows[1].tolist() and rows[0][0] == inputs.prefix[0] and (keep == 0 or len(rows[0]) == keep)


def test_the_bos_prefix_is_found_whether_or_not_the_tokenizer_appends_an_eos(checkpoint):
    """A tokenizer saved with add_eos_token puts EOS after the text: its BOS was missed (TEXT got no BOS)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert leading_special_tokens(tokenizer) == [tokenizer.bos_token_id]
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    specials = [(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)]
    tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=specials)
    assert tokenizer.encode("a")[-1] == tokenizer.eos_token_id and leading_special_tokens(tokenizer) == [tokenizer.bos_token_id]
    tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"$A {eos}", special_tokens=specials)
    assert leading_special_tokens(tokenizer) == []


def test_a_failed_steps_cache_lookups_reach_on_step(checkpoint):
    """The step looked its prompt up in the prefix cache before its forward failed: on_step sees it (no rows
    answered), so the hits reach the metrics (they were lost: the next step's counts start after them)."""
    cached = TorchRewardEngine(str(checkpoint), device="cpu", max_step_tokens=1024, prefix_cache_tokens=1024)
    prompt = np.random.default_rng(8).integers(0, 128_000, 200)
    cached.score([prompt])  # three whole blocks kept

    def fails(*args):
        raise RuntimeError("the forward fails")

    cached._forward = fails
    seen = []
    row = np.concatenate([prompt, prompt[:40]])
    (answer,) = answers(cached, [Rows([row], [np.array([len(row) - 1])])], lambda result, lengths: seen.append((result, lengths)))
    assert answer.error is not None
    ((result, lengths),) = seen
    assert result.error is not None and lengths == [] and result.cache.hits == 3


def _cut_conversation(tokenizer, messages: list, limit: int) -> list[int]:
    """What KEEP_LAST_TOKENS gives, by brute force: the conversation less its fewest earliest exchanges that fit."""
    head = 1 if messages[0]["role"] == "system" else 0
    for dropped in range((len(messages) - head) // 2):
        ids = tokenizer.apply_chat_template(messages[:head] + messages[head + 2 * dropped :], tokenize=True, return_dict=False)
        if len(ids) <= limit:
            return ids
    raise AssertionError("no cut fits")


def test_keep_last_tokens_drops_the_fewest_exchanges_in_a_few_renders(checkpoint, monkeypatch):
    """A cut conversation is what the brute force gives, found in a few renders (one per dropped exchange took a
    256-turn conversation 127 renders of everything left: a stalled preprocessing), and non-ASCII text within
    max_bytes stays within it (the cut re-encoded the messages as escaped JSON: 3 bytes of UTF-8 became 6)."""
    from reward_client.conversation import to_json

    chat = ChatTokenizer(str(checkpoint), max_tokens=4096, max_bytes=20_000)
    inputs = Inputs(chat)
    cjk = [{"role": role, "content": "海" * 400 + str(k)} for k in range(6) for role in ("user", "assistant")]
    many = [{"role": "system", "content": "Be brief."}]
    many += [{"role": role, "content": f"turn {k}: " + "word " * (k % 7 + 1)} for k in range(64) for role in ("user", "assistant")]
    renders = []
    monkeypatch.setattr(chat, "render", lambda messages, render=chat.render: renders.append(1) or render(messages))
    for messages, kept in ((cjk, 4), (many, 10), (many, 50)):
        head = messages[:1] if messages[0]["role"] == "system" else []
        limit = len(chat.tokenizer.apply_chat_template(head + messages[-kept:], tokenize=True, return_dict=False)) + 3
        payload = to_json(messages)
        assert len(payload) < chat.max_bytes < len(json.dumps(messages)) or messages is many  # within max_bytes; escaped, over
        renders.clear()
        ids, reads = inputs.conversation(payload, all_turns=False, keep_last=limit)
        expected = _cut_conversation(chat.tokenizer, messages, limit)
        assert ids.tolist() == expected and reads.tolist() == [len(expected) - 1]
        assert len(renders) <= 2 + int(np.ceil(np.log2(len(messages) // 2)))


def test_keep_last_tokens_names_the_length_of_what_is_never_cut(inputs):
    system = {"role": "system", "content": "Rules. " * 300}
    last = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    tokenizer = inputs.chat.tokenizer
    for messages, words in (([system, *last, *last], "its system turn and last exchange are"), (last, "its last exchange alone is")):
        kept = len(tokenizer.apply_chat_template([m for m in messages if m["role"] == "system"] + last, tokenize=True, return_dict=False))
        with pytest.raises(RequestError, match=f"conversation: {words} {kept} tokens, over the limit of 20 tokens") as caught:
            inputs.conversation(json.dumps(messages).encode(), all_turns=False, keep_last=20)
        assert caught.value.reason == "too_long"


def test_keep_last_tokens_with_per_turn_scores_scores_what_fits_and_refuses_a_cut(inputs):
    """A client sending KEEP_LAST_TOKENS with every request gets per-turn scores of what fits (it was refused
    whenever both were sent); a conversation that would be cut is refused: it would lose turns."""
    messages = [{"role": role, "content": f"turn {k}"} for k in range(3) for role in ("user", "assistant")]
    payload = json.dumps(messages).encode()
    whole = inputs.chat.encode(payload, all_turns=True)
    ids, reads = inputs.conversation(payload, all_turns=True, keep_last=len(whole[0]))
    assert ids.tolist() == whole[0].tolist() and reads.tolist() == whole[1].tolist() and len(reads) == 3
    with pytest.raises(RequestError, match=f"{len(ids)} tokens is over KEEP_LAST_TOKENS {len(ids) - 1}, and with SCORE_TURNS") as caught:
        inputs.conversation(payload, all_turns=True, keep_last=len(ids) - 1)
    assert caught.value.reason == "per_turn"
