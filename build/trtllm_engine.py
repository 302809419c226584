"""Build a TensorRT-LLM reward engine that `reward_engine` (runtime `tensorrt_llm`) serves.

    make engine CHECKPOINT=/models/Llama-3.1-Nemotron-70B-Reward-HF TP=8 DTYPE=bf16 ENGINE=/engines/nemotron-70b-rm
    make engine CHECKPOINT=/models/Llama-3.1-Nemotron-70B-Reward-HF TP=1 DTYPE=fp8  ENGINE=/engines/nemotron-70b-rm-fp8

bf16: build/trtllm_checkpoint.py (this project; head folded into lm_head, TP shards) -> trtllm-build.
fp8:  TensorRT-LLM's examples/quantization/quantize.py (ModelOpt calibration; it reads the -HF layout,
      whose reward row is already lm_head row 0, and keeps lm_head unquantized) -> trtllm-build.
      Calibrated on chat conversations rendered with the checkpoint's own template (default: the
      project's build/calibration_conversations.jsonl; --calib-conversations for a sample of your
      traffic), never on quantize.py's default cnn_dailymail, which it downloads from the Hub.
Either way the engine reads the reward from the first generated step's float32 logits, never gathers
context logits, and takes prompts of up to `--max-tokens` (the max_tokens setting, 4,096 by default). The engine folder also receives the
tokenizer, the chat template and reward_head.json, so REWARD_CHECKPOINT=<engine folder> serves it.

Targets TensorRT-LLM 1.0 (the tritonserver:25.10-trtllm-python-py3 container); needs `trtllm-build`
and, for fp8, TRTLLM_EXAMPLES pointing at TensorRT-LLM's examples/ folder. --dry-run prints the
commands without running them (that part is tested; the build itself is UNVERIFIED here).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from reward_client.conversation import parse_json
from reward_client.protocol import MAX_BATCH_SIZE
from reward_server.settings import Settings
from reward_server.templating import TOKENIZER_FILES

BUILD = Path(__file__).resolve().parent
CALIBRATION_CONVERSATIONS = BUILD / "calibration_conversations.jsonl"  # tests/corpus.py's conversations, one JSON per line


def read_conversations(path: Path) -> list[list]:
    """One wire-format conversation (the client's JSON) per non-empty line."""
    return [parse_json(line.encode("utf-8")) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_calibration_set(checkpoint: Path, conversations: Path, out: Path, max_tokens: int = Settings.max_tokens) -> int:
    """quantize.py's --calib_dataset: a folder whose `train` split has a `text` column. TensorRT-LLM 1.0
    (tensorrt_llm/quantization/quantize_by_modelopt.py, get_calib_dataloader) reads a local folder as
    load_dataset(folder, split="train")["text"] and tokenizes all texts in one call, with special tokens,
    truncated to --calib_max_seq_length and left-padded to the longest, keeping no attention mask: every
    calibration forward attends to the padding. One conversation per text padded the 22 of the default set
    to their longest (90 % of the tokens fed were padding), so whole conversations are packed into texts of
    near-equal token counts (pack_rows). Each conversation is rendered with the checkpoint's chat template, its
    tokens the server's; a text is its conversations back to back, less the first one's BOS, which the tokenizer
    adds again. Returns the number of texts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=False) for m in read_conversations(conversations)]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    bos = tokenizer.bos_token
    rows = ["".join(texts[i] for i in row) for row in pack_rows(lengths, max_tokens)]
    rows = [row[len(bos) :] if bos and row.startswith(bos) else row for row in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps({"text": row}, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return len(rows)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Which items (by index) go in each row: whole items, longest first, each onto the shortest row it fits in,
    rows opened as few as the total needs (one more where none has room; an item over `capacity` alone in one),
    so that rows end near one length and padding them to the longest adds little."""
    rows: list[list[int]] = [[] for _ in range(max(1, -(-sum(lengths) // capacity)))]
    sizes = [0] * len(rows)
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        room = [r for r in range(len(rows)) if sizes[r] + lengths[item] <= capacity or (not rows[r] and lengths[item] > capacity)]
        if not room:
            rows.append([])
            sizes.append(0)
            room = [len(rows) - 1]
        row = min(room, key=sizes.__getitem__)
        rows[row].append(item)
        sizes[row] += lengths[item]
    return [row for row in rows if row]


def commands(
    checkpoint: Path,
    engine: Path,
    tp: int,
    dtype: str,
    max_num_tokens: int,
    examples: Path | None,
    max_tokens: int = Settings.max_tokens,
    calib_size: int = 0,
) -> list[list[str]]:
    """The conversion (or quantization) and the trtllm-build command lines; fp8 calibrates on the
    texts that write_calibration_set puts in <engine>/calibration (`calib_size`: the number of conversations, which
    are packed into as many texts or fewer; quantize.py takes that many from the start)."""
    converted = engine / "trtllm-checkpoint"
    if max_num_tokens < max_tokens:  # without chunked context a prompt must fit one step of the engine
        raise ValueError(f"--max-num-tokens {max_num_tokens} is below --max-tokens {max_tokens}: a longest prompt would not fit a step")
    if dtype == "bf16":
        convert = [sys.executable, str(BUILD / "trtllm_checkpoint.py"), "--checkpoint", str(checkpoint)]
        convert += ["--tp", str(tp), "--dtype", "bfloat16", "--out", str(converted)]
    elif dtype == "fp8":
        if examples is None:
            raise ValueError("fp8 needs TRTLLM_EXAMPLES: TensorRT-LLM's examples/ folder (for quantization/quantize.py)")
        if (checkpoint / "reward_head.safetensors").exists():
            raise ValueError("fp8 quantizes the -HF layout (reward rows in lm_head); this checkpoint has a separate head")
        convert = [sys.executable, str(examples / "quantization" / "quantize.py"), "--model_dir", str(checkpoint)]
        convert += ["--dtype", "bfloat16", "--qformat", "fp8", "--kv_cache_dtype", "fp8"]
        # A folder path: neither "cnn_dailymail", "scienceqa" nor "pileval", which quantize.py fetches from the Hub.
        convert += ["--calib_dataset", str(engine / "calibration"), "--calib_size", str(calib_size)]
        convert += ["--calib_max_seq_length", str(max_tokens)]
        convert += ["--tp_size", str(tp), "--output_dir", str(converted)]
    else:
        raise ValueError(f"dtype {dtype!r}: expected bf16 or fp8")
    build = ["trtllm-build", "--checkpoint_dir", str(converted), "--output_dir", str(engine)]
    build += ["--gather_generation_logits", "--logits_dtype", "float32"]  # the reward is a float32 logit of step 1
    build += ["--max_input_len", str(max_tokens), "--max_seq_len", str(max_tokens + 1)]
    build += ["--max_num_tokens", str(max_num_tokens), "--max_batch_size", str(MAX_BATCH_SIZE), "--max_beam_width", "1"]
    build += ["--gemm_plugin", "auto", "--workers", str(tp)]
    if dtype == "fp8":
        build += ["--use_fp8_context_fmha", "enable"]
    return [convert, build]


def copy_serving_files(checkpoint: Path, engine: Path) -> None:
    """Tokenizer, chat template and reward_head.json beside the engine (the bf16 conversion already
    wrote reward_head.json with the bias; for fp8 the checkpoint's own, if any, is the description)."""
    converted = engine / "trtllm-checkpoint"
    for name in (*TOKENIZER_FILES, "reward_head.json"):
        source = converted / name if (converted / name).exists() else checkpoint / name
        if source.exists():
            shutil.copy2(source, engine / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="transformers Llama reward checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="engine folder (created)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (default: 1)")
    parser.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16", help="default: bf16")
    parser.add_argument("--max-num-tokens", type=int, default=16384, help="tokens per engine step (default: 16384)")
    max_tokens_help = f"longest prompt, the max_tokens setting (default: {Settings.max_tokens})"
    parser.add_argument("--max-tokens", type=int, default=Settings.max_tokens, help=max_tokens_help)
    calib_help = "fp8: conversations to calibrate on, one JSON per line (default: build/calibration_conversations.jsonl)"
    parser.add_argument("--calib-conversations", type=Path, default=CALIBRATION_CONVERSATIONS, help=calib_help)
    parser.add_argument("--calibration-only", action="store_true", help="fp8: write <out>/calibration and stop")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    examples = Path(os.environ["TRTLLM_EXAMPLES"]) if os.environ.get("TRTLLM_EXAMPLES") else None
    if args.calibration_only and args.dtype != "fp8":
        sys.exit("error: --calibration-only goes with --dtype fp8")
    calib_size = len(read_conversations(args.calib_conversations)) if args.dtype == "fp8" else 0
    try:
        steps = commands(args.checkpoint, args.out, args.tp, args.dtype, args.max_num_tokens, examples, args.max_tokens, calib_size)
    except ValueError as exc:
        if not args.calibration_only:
            sys.exit(f"error: {exc}")
    if args.dtype == "fp8" and not args.dry_run:
        texts = write_calibration_set(args.checkpoint, args.calib_conversations, args.out / "calibration", args.max_tokens)
        print(f"calibration set: {calib_size} conversations of {args.calib_conversations} as {texts} texts", flush=True)
        if args.calibration_only:
            return
    for step in steps:
        print("+", shlex.join(step), flush=True)
        if not args.dry_run:
            if shutil.which(step[0]) is None and not Path(step[0]).exists():
                sys.exit(f"error: {step[0]} not found (run inside NVIDIA's tritonserver:<yy.mm>-trtllm-python-py3 container)")
            subprocess.run(step, check=True)
    if not args.dry_run:
        copy_serving_files(args.checkpoint, args.out)
        print(f"engine written to {args.out}; serve it with REWARD_CHECKPOINT={args.out} and runtime tensorrt_llm")


if __name__ == "__main__":
    main()
