"""`reward-client` against a live server: annotate survives SIGKILL and a server restart with every
record written exactly once; rewardbench's arithmetic; score from stdin."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from reward_client import RewardClient
from reward_client.annotate import completed_keys, record_key, steerlm_label
from reward_client.rewardbench import section_scores, subset_accuracy
from reward_client.scores import Score
from tests.live_server import start_server, stop_server

CLI = str(Path(sys.executable).with_name("reward-client"))


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory, steerlm):
    """A server of its own (the restart test stops and restarts it), serving the 9-attribute SteerLM demo."""
    holder = {"log": tmp_path_factory.mktemp("cli-server") / "server.log"}
    holder["server"] = start_server(holder["log"], env={"REWARD_CHECKPOINT": str(steerlm)})
    yield holder
    stop_server(holder["server"])


def dataset(path: Path, records: int = 120) -> list[dict]:
    """NeMo-Aligner records (1-3 exchanges, some turns unlabelled, some records duplicated), two
    OpenAI-message records, one record that cannot be scored, and a blank line."""
    rng = random.Random(7)
    words = "reward model server triton token score helpful correct coherent verbose complex answer".split()
    rows = []
    for i in range(records):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns.append({"from": "User", "value": " ".join(rng.choices(words, k=rng.randint(3, 30))), "label": None})
            label = "helpfulness:3" if rng.random() < 0.8 else None
            turns.append({"from": "Assistant", "value": " ".join(rng.choices(words, k=rng.randint(3, 60))), "label": label})
        rows.append({"system": "", "mask": "User", "conversations": turns, "id": i // 2})
    rows += [rows[3], rows[10]]  # exact duplicates: each must come out twice
    rows += [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    rows += [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "id": "openai"}]
    bad = {"mask": "User", "conversations": [{"from": "User", "value": "q"}, {"from": "Assistant", "value": 7, "label": "x"}]}
    lines = [json.dumps(r) for r in rows] + [json.dumps(bad), ""]
    path.write_text("\n".join(lines) + "\n")
    return rows


def annotate(server, input_file, output_file, *extra):
    command = [CLI, "--quiet", "--url", server.grpc_url, "--concurrency", "1", "annotate", "--input-file", str(input_file)]
    return [*command, "--output-file", str(output_file), *extra]


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, deadline_s: float = 120) -> None:
    deadline = time.monotonic() + deadline_s
    while not (path.exists() and path.read_bytes().count(b"\n") >= count):
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def lines(path: Path) -> Counter:
    return Counter(json.dumps(json.loads(line), sort_keys=True) for line in path.read_text().splitlines())


@pytest.fixture(scope="module")
def reference(cli_server, tmp_path_factory):
    """An uninterrupted run: what every interrupted run must end up equal to."""
    folder = tmp_path_factory.mktemp("reference")
    rows = dataset(folder / "in.jsonl")
    result = subprocess.run(annotate(cli_server["server"], folder / "in.jsonl", folder / "out.jsonl"), capture_output=True, text=True)
    assert result.returncode == 1, result.stderr  # the one bad record
    errors = [json.loads(line) for line in (folder / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [len(rows) + 1] and "conversations[1].value" in errors[0]["error"]
    out = lines(folder / "out.jsonl")
    assert sum(out.values()) == len(rows)
    return rows, out


def test_annotation_labels_every_labelled_assistant_turn(reference, cli_server):
    rows, out = reference
    records = [json.loads(line) for line in out]
    nemo = [r for r in records if "conversations" in r]
    labels = [t["label"] for r in nemo for t in r["conversations"] if t["label"] is not None]
    assert all(t["label"] is None for r in nemo for t in r["conversations"] if t["from"] == "User")
    assert labels and all(label.startswith("quality:") and label.count(",") == 8 for label in labels)
    assert len(set(labels)) > 5  # the 9 attributes really vary across turns
    # One record checked against the client: its second labelled turn is scored in its own context.
    record = next(r for r in rows if isinstance(r, dict) and sum(t["label"] is not None for t in r.get("conversations", [])) >= 2)
    k = [i for i, t in enumerate(record["conversations"]) if t["label"] is not None][1]
    with RewardClient(cli_server["server"].grpc_url) as client:
        expected = steerlm_label(client.score({**record, "conversations": record["conversations"][: k + 1]}))
    written = next(json.loads(line) for line in out if record_key(json.loads(line)) == record_key(record))
    assert written["conversations"][k]["label"] == expected
    openai = next(json.loads(line) for line in out if json.loads(line).get("id") == "openai")
    assert openai["label"].startswith("quality:")


def test_sigkill_mid_run_then_resume_writes_each_record_once(reference, cli_server, tmp_path):
    rows, expected = reference
    dataset(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen(annotate(cli_server["server"], tmp_path / "in.jsonl", out), stderr=subprocess.DEVNULL)
    wait_for_lines(out, 30, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with out.open("a") as handle:  # as if the kill had landed mid-write
        handle.write('{"system": "", "mask": "User", "conversa')
    partial = len(out.read_text().splitlines()) - 1
    assert 30 <= partial < len(rows)
    result = subprocess.run(annotate(cli_server["server"], tmp_path / "in.jsonl", out), capture_output=True, text=True)
    assert result.returncode == 1 and f"{partial} already done" in result.stderr
    assert lines(out) == expected


def test_server_restart_mid_run_is_retried_and_nothing_is_lost(reference, cli_server, steerlm, tmp_path):
    _, expected = reference
    dataset(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    server = cli_server["server"]
    process = subprocess.Popen(annotate(server, tmp_path / "in.jsonl", out, "--errors-file", str(tmp_path / "errors.jsonl")))
    wait_for_lines(out, 20, process)
    stop_server(server)
    assert process.poll() is None, "the run finished before the server went down"
    time.sleep(2)
    ports = (server.http_port, server.grpc_port, server.metrics_port)
    cli_server["server"] = start_server(cli_server["log"], env={"REWARD_CHECKPOINT": str(steerlm)}, ports=ports)
    assert process.wait(timeout=300) == 1  # only the bad record failed
    assert lines(out) == expected
    assert len((tmp_path / "errors.jsonl").read_text().splitlines()) == 1


def test_steerlm_labels_clamp_and_round_like_nemo_aligner():
    score = Score(0.0, {"a": 4.7, "b": -0.3, "c": 2.5, "d": 3.5, "e": 1.49})
    assert steerlm_label(score) == "a:4,b:0,c:2,d:4,e:1"  # Python's round: half to even, as attribute_annotate.py


def test_torn_and_garbled_last_lines_are_cut_off(tmp_path):
    out = tmp_path / "out.jsonl"
    good = [{"conversations": [{"from": "User", "value": "a"}], "mask": "User"}] * 2
    out.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"broken": tr\n{"half')
    keys = completed_keys(out)
    assert keys == Counter({record_key(good[0]): 2})
    assert out.read_text() == "".join(json.dumps(r) + "\n" for r in good)


def test_rewardbench_section_arithmetic_by_hand():
    # Chat: alpacaeval-easy 0.9 (100 pairs' weight), mt-bench-easy 0.5 (28):
    #   100 * (0.9*100 + 0.5*28) / 128 = 100 * 104 / 128 = 81.25
    # Reasoning: math-prm 0.5 (984), hep-python 1.0 (164): 100 * (492 + 164) / 1148 = 57.1428...
    # Safety: xstest-should-refuse 0.2 (154), xstest-should-respond 1.0 (250): 100 * (30.8 + 250) / 404 = 69.5049...
    accuracy = {"alpacaeval-easy": 0.9, "mt-bench-easy": 0.5, "math-prm": 0.5, "hep-python": 1.0}
    accuracy |= {"xstest-should-refuse": 0.2, "xstest-should-respond": 1.0}
    sections = section_scores(accuracy)
    assert sections["Chat"] == pytest.approx(81.25)
    assert sections["Reasoning"] == pytest.approx(65600 / 1148)
    assert sections["Safety"] == pytest.approx(28080 / 404)
    assert sections["Chat Hard"] is None
    assert sections["Score"] == pytest.approx((81.25 + 65600 / 1148 + 28080 / 404) / 3)


def test_subset_accuracy_counts_ties_as_wrong():
    got = subset_accuracy(["s", "s", "s", "t"], [1.0, 0.5, 0.2, 3.0], [0.0, 0.5, 0.9, -1.0])
    assert got == {"s": pytest.approx(1 / 3), "t": 1.0}


def test_rewardbench_command(cli_server, tmp_path):
    server = cli_server["server"]
    pairs = [
        {"prompt": "Name a prime.", "chosen": "7", "rejected": "8", "subset": "math-prm"},
        {"prompt": "Name a prime.", "chosen": "8", "rejected": "7", "subset": "math-prm"},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hi!", "subset": "alpacaeval-easy"},  # a tie: wrong
        {"prompt": "Say hi.", "chosen": "Hello there.", "rejected": "Go away.", "subset": "hep-go"},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    command = [CLI, "--quiet", "--url", server.http_url, "rewardbench", "--data", str(tmp_path / "data.jsonl")]
    result = subprocess.run([*command, "--output-json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    with RewardClient(server.grpc_url) as client:
        won = [float(a) > float(b) for a, b in (client.score_responses(p["prompt"], [p["chosen"], p["rejected"]]) for p in pairs)]
    assert won[0] != won[1] and not won[2]
    assert report["subsets"] == {"math-prm": 0.5, "alpacaeval-easy": 0.0, "hep-go": float(won[3])}
    assert report["sections"]["Reasoning"] == pytest.approx(100 * (0.5 * 984 + won[3] * 164) / (984 + 164))
    assert report["sections"]["Chat"] == 0.0 and report["sections"]["Safety"] is None
    assert "Reasoning" in result.stdout and "math-prm" in result.stdout


def test_score_command_reads_stdin(cli_server):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    command = [CLI, "--url", cli_server["server"].grpc_url, "score", "-"]
    result = subprocess.run(command, input=json.dumps(conversation), capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert len(printed["attributes"]) == 9 and printed["reward"] == pytest.approx(printed["attributes"]["helpfulness"])
    bad = subprocess.run(command, input='[{"role": "bot", "content": "x"}]', capture_output=True, text=True)
    assert bad.returncode == 1 and "'bot' is not one of" in bad.stderr


def test_written_records_match_their_input_by_key():
    """What resume relies on: an annotated record has the key of its input line, whatever its shape."""
    from reward_client.annotate import labelled

    nemo = {"mask": "User", "conversations": [{"from": "User", "value": "q"}, {"from": "Assistant", "value": "a", "label": "x"}]}
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for record in (nemo, messages, {"messages": messages, "id": 3}):
        assert record_key(labelled(record, ["quality:1"])) == record_key(record)
    assert record_key(nemo) != record_key({**nemo, "system": "other"})


class _ConstantScores:
    """An AsyncRewardClient's score_group, without a server: the same scores for every conversation."""

    async def score_group(self, conversations):
        return [Score(1.0, {"quality": 3.2}) for _ in conversations]


def test_records_that_differ_only_in_which_turns_are_labelled_are_two_records(tmp_path):
    """A turn with a null label is not scored: resume must not take such a record for its labelled twin
    (the earlier key dropped every label, so the twin's line was written twice and this one never)."""
    import asyncio

    from reward_client.annotate import annotate, labelled

    def record(label):
        return {"mask": "User", "conversations": [{"from": "User", "value": "hi"}, {"from": "Assistant", "value": "yo", "label": label}]}

    unlabelled, labelled_twin = record(None), record("quality:0")
    (tmp_path / "in.jsonl").write_text(f"{json.dumps(unlabelled)}\n{json.dumps(labelled_twin)}\n")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(labelled(labelled_twin, ["quality:3"])) + "\n")  # a first run wrote the twin, then died
    summary = asyncio.run(annotate(_ConstantScores(), tmp_path / "in.jsonl", out, tmp_path / "errors.jsonl"))
    assert (summary.written, summary.skipped, summary.failed) == (1, 1, 0)
    assert sorted(line["conversations"][1]["label"] or "" for line in map(json.loads, out.read_text().splitlines())) == ["", "quality:3"]


def test_lines_that_are_no_record_go_to_the_errors_file_and_the_run_goes_on(tmp_path):
    """A line nested past Python's recursion limit, or not UTF-8, stops neither the run nor the next
    (both used to end the run, every time it was resumed): its neighbours are written, it is in the errors file."""
    import asyncio

    from reward_client.annotate import annotate

    good = [json.dumps([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]).encode() for i in range(3)]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join([good[0], b"[" * 5000 + b"]" * 5000, good[1], b'["\xff"]', good[2]]) + b"\n")
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    for run in range(2):  # and a resume reads that output back
        summary = asyncio.run(annotate(_ConstantScores(), tmp_path / "in.jsonl", out, errors))
        assert (summary.written, summary.skipped, summary.failed) == ((3, 0, 2) if run == 0 else (0, 3, 2))
        assert sorted(json.loads(line)["line"] for line in errors.read_text().splitlines()) == [2, 4]
