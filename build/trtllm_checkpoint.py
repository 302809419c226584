"""Convert a Llama reward checkpoint into a TensorRT-LLM checkpoint with the reward head folded into lm_head.

TensorRT-LLM returns no hidden states, so the head has to live inside the engine: `lm_head` keeps
the full vocabulary, the head's N rows become rows 0..N-1 and every other row is zero (the -HF
convention), and the reward is read from the first generated step's logits. A head bias cannot go
into TensorRT-LLM's bias-free `lm_head`; it is written to `reward_head.json` (with the names and the
reward rule), which the `tensorrt_llm` runtime adds after.

Input: a transformers Llama folder in either reward layout of reward_server/heads.py
(-HF: reward rows already in lm_head; or reward_head.safetensors beside the trunk). Output, as
TensorRT-LLM's own `convert_checkpoint.py` lays it out: `config.json` + `rank{r}.safetensors` per
tensor-parallel rank, TensorRT-LLM's Llama weight names, q/k/v fused per rank (key/value heads
repeated when there are fewer than ranks), `lm_head` split by rows (vocabulary padded to a multiple
of the ranks). Tensors are read one at a time, so memory holds one rank's shards, not the model.

    python build/trtllm_checkpoint.py --checkpoint /models/Llama-3.1-Nemotron-70B-Reward-HF --tp 8 --out /engines/ckpt
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reward_server.head_spec import HEAD_SPEC, default_names, head_bias, read_head_spec, read_separate_head
from reward_server.templating import TOKENIZER_FILES

Head = tuple[torch.Tensor, torch.Tensor | None] | None  # a separate head's weight and bias, if any
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Weights:
    """The HF checkpoint's tensors by name, read lazily from its safetensors shards."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
        self._handles = [safe_open(folder / name, framework="pt") for name in files]
        self._where = {key: handle for handle in self._handles for key in handle.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def trtllm_config(hf: dict, tp: int, dtype: str) -> dict:
    """TensorRT-LLM's PretrainedConfig for a Llama model (the keys convert_checkpoint.py writes)."""
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    scaling = None
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        scaling = {"type": rope.get("rope_type", rope.get("type"))}
        scaling.update({k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta")})
    return {
        "architecture": "LlamaForCausalLM",
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "hidden_size": hf["hidden_size"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": hf.get("num_key_value_heads", heads),
        "head_size": hf.get("head_dim") or hf["hidden_size"] // heads,
        "hidden_act": hf.get("hidden_act", "silu"),
        "intermediate_size": hf["intermediate_size"],
        "norm_epsilon": hf["rms_norm_eps"],
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        "rotary_scaling": scaling,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "tie_word_embeddings": False,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


def folded_lm_head(weights: Weights, folder: Path, separate: Head, vocab_size: int, hidden_size: int) -> torch.Tensor:
    """[vocab, hidden]: the reward head in rows 0..N-1, zeros elsewhere."""
    if separate is not None:
        rows = separate[0]
    else:
        n = len(read_head_spec(folder, default_names(1)).names)
        tied = "lm_head.weight" not in weights  # tie_word_embeddings: the embedding matrix is the LM head
        rows = weights["model.embed_tokens.weight" if tied else "lm_head.weight"][:n]
    if rows.shape[1] != hidden_size:
        raise ValueError(f"reward head {tuple(rows.shape)} does not take hidden size {hidden_size}")
    head = torch.zeros(vocab_size, hidden_size, dtype=rows.dtype)
    head[: rows.shape[0]] = rows
    return head


def head_description(folder: Path, separate: Head) -> dict:
    """reward_head.json for the engine: names, reward rule, and the bias the engine cannot hold."""
    spec = read_head_spec(folder, default_names(1 if separate is None else separate[0].shape[0]))
    bias = head_bias(folder, spec, None if separate is None else separate[1])
    description = {"attributes": spec.names, "reward": {"weights": spec.reward_weights.tolist()}}
    return description if bias is None else {**description, "bias": bias.float().tolist()}


def split(tensor: torch.Tensor, parts: int, rank: int, dim: int = 0) -> torch.Tensor:
    return torch.chunk(tensor, parts, dim=dim)[rank].contiguous()


def repeat_kv(weight: torch.Tensor, kv_heads: int, tp: int) -> torch.Tensor:
    """With fewer key/value heads than ranks, each head is repeated so that every rank holds one."""
    if kv_heads >= tp:
        return weight
    if tp % kv_heads:
        raise ValueError(f"tensor parallelism {tp} is not a multiple of the {kv_heads} key/value heads")
    return weight.reshape(kv_heads, 1, -1, weight.shape[-1]).expand(-1, tp // kv_heads, -1, -1).reshape(-1, weight.shape[-1])


def rank_weights(weights: Weights, config: dict, lm_head: torch.Tensor, tp: int, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    kv_heads = config["num_key_value_heads"]
    if config["num_attention_heads"] % tp or (kv_heads >= tp and kv_heads % tp):
        raise ValueError(f"tensor parallelism {tp} does not divide {config['num_attention_heads']} heads / {kv_heads} key/value heads")
    out = {
        "transformer.vocab_embedding.weight": weights["model.embed_tokens.weight"],
        "transformer.ln_f.weight": weights["model.norm.weight"],
    }
    padded = -(-lm_head.shape[0] // tp) * tp
    out["lm_head.weight"] = split(torch.nn.functional.pad(lm_head, (0, 0, 0, padded - lm_head.shape[0])), tp, rank)
    for layer in range(config["num_hidden_layers"]):
        hf, trt = f"model.layers.{layer}.", f"transformer.layers.{layer}."
        q = split(weights[hf + "self_attn.q_proj.weight"], tp, rank)
        k = split(repeat_kv(weights[hf + "self_attn.k_proj.weight"], kv_heads, tp), tp, rank)
        v = split(repeat_kv(weights[hf + "self_attn.v_proj.weight"], kv_heads, tp), tp, rank)
        out[trt + "attention.qkv.weight"] = torch.cat([q, k, v])
        out[trt + "attention.dense.weight"] = split(weights[hf + "self_attn.o_proj.weight"], tp, rank, dim=1)
        # TensorRT-LLM's GatedMLP: proj(act(fc(x)) * gate(x)), so fc is HF's gate_proj and gate is up_proj.
        out[trt + "mlp.fc.weight"] = split(weights[hf + "mlp.gate_proj.weight"], tp, rank)
        out[trt + "mlp.gate.weight"] = split(weights[hf + "mlp.up_proj.weight"], tp, rank)
        out[trt + "mlp.proj.weight"] = split(weights[hf + "mlp.down_proj.weight"], tp, rank, dim=1)
        out[trt + "input_layernorm.weight"] = weights[hf + "input_layernorm.weight"]
        out[trt + "post_layernorm.weight"] = weights[hf + "post_attention_layernorm.weight"]
    return {name: tensor.to(dtype).contiguous() for name, tensor in out.items()}


def convert(checkpoint: Path, out: Path, tp: int = 1, dtype: str | None = None) -> dict:
    hf = json.loads((checkpoint / "config.json").read_text())
    if "LlamaForCausalLM" not in hf.get("architectures", []):
        raise ValueError(f"{checkpoint}: only LlamaForCausalLM checkpoints are converted (found {hf.get('architectures')})")
    dtype = dtype or hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    config = trtllm_config(hf, tp, dtype)
    weights = Weights(checkpoint)
    separate = read_separate_head(checkpoint)
    lm_head = folded_lm_head(weights, checkpoint, separate, config["vocab_size"], config["hidden_size"])
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(tp):
        save_file(rank_weights(weights, config, lm_head, tp, rank, DTYPES[dtype]), out / f"rank{rank}.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / HEAD_SPEC).write_text(json.dumps(head_description(checkpoint, separate), indent=2) + "\n")
    for name in TOKENIZER_FILES:  # the engine folder stays servable on its own
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, out / name)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="transformers Llama reward checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="TensorRT-LLM checkpoint folder (created)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default: 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's)")
    args = parser.parse_args()
    try:
        config = convert(args.checkpoint, args.out, args.tp, args.dtype)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    print(f"TensorRT-LLM checkpoint ({config['dtype']}, tp {args.tp}) written to {args.out}")


if __name__ == "__main__":
    main()
