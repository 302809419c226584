"""JSONL annotation: label every assistant turn that asks for one, resumable, nothing lost or repeated.

Input records, one JSON value per line:
- NeMo-Aligner: {"system": ..., "mask": "User", "conversations": [{"from": ..., "value": ..., "label": ...}]};
  every assistant turn whose "label" is present and not null is scored in its conversation's context
  (the conversation cut after that turn) and its label replaced, as NeMo-Aligner's
  attribute_annotate.py does;
- OpenAI messages: a list of {"role", "content"}, or an object with such a "messages" list; the final
  assistant turn is scored and the object gets a "label" (a list becomes {"messages": [...], "label": ...}).

Labels: `steerlm` writes "name:value,..." with each head output clamped to 0-4 and rounded (exactly
attribute_annotate.py's format); `float` writes the same with the raw values.

Output: each annotated record is written whole, as one line, in a single write and flushed. Records
are matched to the input by content (the labels annotation writes ignored) and by occurrence, so a
re-run skips exactly the records already written (duplicated input records each count), and a line torn
by a crash is cut off first. Records that still fail after the client's retries, and lines that are no
record (not UTF-8, not JSON, nested too deep), go to the errors file with their line number and message;
they are not in the output, so the next run tries them again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reward_client import conversation as conv
from reward_client.scores import Score

FORMATS = ("steerlm", "float")


def steerlm_label(score: Score) -> str:
    """attribute_annotate.py's label: every output clamped to [0, 4] and rounded (half to even)."""
    return ",".join(f"{name}:{round(min(4.0, max(0.0, value)))}" for name, value in score.attributes.items())


def float_label(score: Score) -> str:
    return ",".join(f"{name}:{value!r}" for name, value in score.attributes.items())


LABELS: dict[str, Callable[[Score], str]] = {"steerlm": steerlm_label, "float": float_label}


def record_key(record: Any) -> str:
    """Identity of a record that annotation does not change: its content without the labels annotate
    writes. A NeMo-Aligner turn it labels keeps only the mark that it has a label (a turn with a null
    label is not scored: two records that differ there are two records); any other "label" is content."""
    if isinstance(record, list):  # a bare message list is written out as {"messages": [...], "label": ...}
        record = {"messages": record}
    if isinstance(record, dict) and "conversations" in record:
        labelled_turns = set(_labelled_turns(record))
        record = {
            **record,
            "conversations": [{**t, "label": True} if k in labelled_turns else t for k, t in enumerate(record["conversations"])],
        }
    elif isinstance(record, dict):
        record = {k: v for k, v in record.items() if k != "label"}
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def scored_turns(record: Any) -> list[list[conv.Message]]:
    """The conversations to score for a record, one per label to write; the whole record is validated."""
    if isinstance(record, dict) and "conversations" in record:
        turns = record["conversations"]
        conv.normalize({**record, "conversations": _through_last_assistant(turns)})
        return [conv.normalize({**record, "conversations": turns[: k + 1]}) for k in _labelled_turns(record)]
    messages = record["messages"] if isinstance(record, dict) and "messages" in record else record
    return [conv.normalize(messages)]


def _through_last_assistant(turns: Any) -> Any:
    """The turns up to the last assistant turn (a record may end with a user turn nobody scores)."""
    if not isinstance(turns, list):
        return turns
    ends = [k for k, t in enumerate(turns) if isinstance(t, dict) and t.get("from") == "Assistant"]
    return turns[: ends[-1] + 1] if ends else turns


def _labelled_turns(record: dict) -> list[int]:
    """Indices of the turns of a NeMo-Aligner record whose label is to be written."""
    mask = record.get("mask", "User")
    return [
        k for k, t in enumerate(record["conversations"]) if isinstance(t, dict) and t.get("from") != mask and t.get("label") is not None
    ]


def labelled(record: Any, labels: list[str]) -> Any:
    """The record with its labels filled in (see the module docstring)."""
    if isinstance(record, dict) and "conversations" in record:
        turns = [dict(t) for t in record["conversations"]]
        for k, label in zip(_labelled_turns(record), labels, strict=True):
            turns[k]["label"] = label
        return {**record, "conversations": turns}
    if isinstance(record, dict):
        return {**record, "label": labels[0]}
    return {"messages": record, "label": labels[0]}


def completed_keys(output: Path) -> Counter[str]:
    """Keys of the records already in the output; a torn last line (a crash mid-write) is cut off."""
    if not output.exists():
        return Counter()
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished line
    lines = data[:keep].splitlines()
    while lines:
        try:
            json.loads(lines[-1])
            break
        except json.JSONDecodeError:  # a whole but garbled last line: also unfinished
            keep -= len(lines.pop()) + 1
    if keep != len(data):
        with output.open("r+b") as handle:
            handle.truncate(keep)
    return Counter(_key_or_none(line) for line in lines)


@dataclass
class Summary:
    written: int = 0
    skipped: int = 0  # already in the output
    failed: int = 0  # in the errors file


async def annotate(
    client: Any,
    input_file: Path,
    output_file: Path,
    errors_file: Path,
    label_format: str = "steerlm",
    concurrency: int = 16,
    progress: Callable[[int], None] = lambda n: None,
) -> Summary:
    """Annotate `input_file` into `output_file` with an AsyncRewardClient; see the module docstring."""
    make_label = LABELS[label_format]
    done = completed_keys(output_file)
    summary = Summary()
    slots = asyncio.Semaphore(concurrency)
    errors_file.unlink(missing_ok=True)
    with output_file.open("a", encoding="utf-8") as out, errors_file.open("a", encoding="utf-8") as errors:

        async def one(line_number: int, text: bytes) -> None:
            try:
                record = json.loads(text)
                cuts = scored_turns(record)
                async with slots:
                    scores = await client.score_group(cuts) if cuts else []
                out.write(json.dumps(labelled(record, [make_label(s) for s in scores]), ensure_ascii=False) + "\n")
                out.flush()
                summary.written += 1
            except Exception as exc:
                errors.write(json.dumps({"line": line_number, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
                errors.flush()
                summary.failed += 1
            progress(1)

        tasks: list[asyncio.Task] = []
        try:
            with input_file.open("rb") as lines:  # a line that is not UTF-8 fails alone, in `one`
                for line_number, text in enumerate(lines, start=1):
                    if not text.strip():
                        continue
                    key = _key_or_none(text)
                    if key is not None and done[key] > 0:
                        done[key] -= 1
                        summary.skipped += 1
                        progress(1)
                        continue
                    tasks.append(asyncio.create_task(one(line_number, text)))
                    if len(tasks) >= 4 * concurrency:  # bounded memory on large inputs
                        await asyncio.gather(*tasks, return_exceptions=True)
                        tasks = []
        except BaseException:  # reading the input failed, or the run was interrupted: end what runs
            for task in tasks:
                task.cancel()
            raise
        finally:  # no task outlives the files it writes
            await asyncio.gather(*tasks, return_exceptions=True)
    if not summary.failed:
        errors_file.unlink(missing_ok=True)
    return summary


def _key_or_none(text: str | bytes) -> str | None:
    """The line's record_key; None for a line that is no record (not JSON, nested past Python's recursion
    limit, "conversations" that are no list of turns): `one` then puts it in the errors file."""
    try:
        return record_key(json.loads(text))
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None
