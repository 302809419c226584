"""NeMo-Aligner's reward-server protocol (nemo_aligner/algorithms/reward_server.py), free of Triton:
the token-id rows of one request. `model_repository/nemo_reward_model/1/model.py` adapts it."""

from __future__ import annotations

import contextlib
import ctypes
import json
from pathlib import Path

import numpy as np

from reward_server.errors import RequestError

SENTENCES, ADD_EOS, TOKENS, LENGTHS = "sentences", "add_EOS", "tokens", "sequence_lengths"
REWARDS, EXCEEDED = "rewards", "exceeded"


def request_rows(
    tokenizer,
    sentences: np.ndarray | None,
    add_eos: np.ndarray | None,
    tokens: np.ndarray | None,
    lengths: np.ndarray | None,
    max_bytes: int = 1 << 20,
    vocabulary: int | None = None,
) -> list[np.ndarray]:
    """Token-id rows of one request: `sentences` (templated text, each at most `max_bytes`, tokenized
    as NeMo-Aligner does: no BOS, EOS only if `add_eos`) or `tokens` [B, S] with `lengths` [B, 1], every
    id below `vocabulary` (default: the tokenizer's size; see `vocabulary`). RequestError names what is wrong."""
    if (sentences is None) == (tokens is None):
        raise RequestError(f"send either '{SENTENCES}' or '{TOKENS}' with '{LENGTHS}'", "tensors")
    rows = _from_sentences(tokenizer, sentences, add_eos, max_bytes) if sentences is not None else _from_tokens(tokens, lengths)
    vocabulary = len(tokenizer) if vocabulary is None else vocabulary
    for b, row in enumerate(rows):
        if not len(row):
            raise RequestError(f"row {b}: nothing to score (0 tokens)", "tensors")
        if row.min() < 0 or row.max() >= vocabulary:
            raise RequestError(f"row {b}: token ids must lie in [0, {vocabulary})", "tensors")
    return [row.astype(np.int32, copy=False) for row in rows]


def vocabulary(tokenizer, checkpoint: str | Path) -> int:
    """Token ids a row may hold: below the tokenizer's size and the model's embedding table's (config.json's, of a
    transformers checkpoint or a TensorRT-LLM engine), whichever is smaller. The engine refuses an id beyond its
    table, and with it the whole call of up to 64 rows, other requests' too: refused here, per request."""
    path = Path(checkpoint) / "config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    parts = [config, *(config.get(key) for key in ("text_config", "pretrained_config"))]
    sizes = [part.get("vocab_size") for part in parts if isinstance(part, dict)]
    return min([len(tokenizer), *(size for size in sizes if isinstance(size, int))])


def _from_sentences(tokenizer, sentences: np.ndarray, add_eos: np.ndarray | None, max_bytes: int) -> list[np.ndarray]:
    texts = sentences.reshape(-1)
    for b, text in enumerate(texts):  # all checked before any is tokenized: the cost of a request stays bounded
        if len(text) > max_bytes:
            raise RequestError(f"{SENTENCES}[{b}]: {len(text)} bytes is over the limit of {max_bytes} bytes", "too_large")
    add_eos = np.zeros(len(texts), dtype=bool) if add_eos is None else add_eos.reshape(-1)
    if len(add_eos) != len(texts):
        raise RequestError(f"'{ADD_EOS}' must have one value per row of '{SENTENCES}'", "tensors")
    if add_eos.any() and tokenizer.eos_token_id is None:
        raise RequestError(f"{ADD_EOS}: this checkpoint's tokenizer has no EOS token", "tensors")
    rows = []
    for b, (text, eos) in enumerate(zip(texts, add_eos, strict=True)):
        try:
            ids = tokenizer(text.decode("utf-8"), add_special_tokens=False).input_ids
        except UnicodeDecodeError as exc:
            raise RequestError(f"{SENTENCES}[{b}]: not valid UTF-8 (byte {exc.start})", "encoding") from None
        rows.append(np.array(ids + [tokenizer.eos_token_id] * bool(eos), dtype=np.int32))
    return rows


def _from_tokens(tokens: np.ndarray, lengths: np.ndarray | None) -> list[np.ndarray]:
    if lengths is None:
        raise RequestError(f"'{TOKENS}' needs '{LENGTHS}'", "tensors")
    counts = lengths.reshape(-1)
    if tokens.ndim != 2 or len(counts) != tokens.shape[0] or np.any(counts < 1) or np.any(counts > tokens.shape[1]):
        raise RequestError(f"'{LENGTHS}' must give one length per '{TOKENS}' row, each between 1 and {tokens.shape[-1]}", "tensors")
    rows = [tokens[b, : counts[b]] for b in range(len(counts))]  # the padding is not looked at
    return rows  # checked against the vocabulary before they are narrowed to INT32 (request_rows)


def release_memory() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise): after a large request, the
    tokenizer's buffers would stay in the process's RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
