"""Settings of the served models: typed, each default defined once, resolved once per model at load.

Where a value comes from, the first that has it:
1. the environment, `REWARD_<NAME>` (`REWARD_MAX_TOKENS=8192`); the `reward-server` launcher sets
   these from its flags (`--max-tokens 8192`), with paths made absolute against its working directory;
2. the `parameters` of the model's own config.pbtxt (for a setting one model needs apart from the
   others, e.g. a second `nemo_reward_model` with `merge_attributes`);
3. the `parameters` of the ensemble's config (model_repository/reward_model/config.pbtxt): one place
   for the whole repository (plain `tritonserver --model-repository` reads them there too);
4. the default in `Settings` below.
Paths in a config.pbtxt are relative to that model's folder.

A relative path in the environment resolves against the working directory of the process reading it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from reward_client.protocol import ENGINE_MODEL, ENSEMBLE_MODEL, NEMO_MODEL, PREPROCESSING_MODEL

ENV_PREFIX = "REWARD_"
RUNTIMES = ("torch", "tensorrt_llm")
DTYPES = ("auto", "fp32", "bf16", "fp16", "fp8")
TRUE_STRINGS = {"1", "true", "yes", "on"}
FALSE_STRINGS = {"0", "false", "no", "off"}


def _setting(default: Any, help: str, models: tuple[str, ...], kind: str = "str", **limits: Any) -> Any:
    return field(default=default, metadata={"help": help, "models": models, "kind": kind, **limits})


ALL = (PREPROCESSING_MODEL, ENGINE_MODEL, NEMO_MODEL)


@dataclass(frozen=True)
class Settings:
    checkpoint: str = _setting("", "transformers reward checkpoint folder, or an engine folder for runtime tensorrt_llm", ALL, "path")
    runtime: str = _setting(
        "torch",
        "torch | tensorrt_llm (an engine built by `make engine`; GPU only, unverified)",
        (ENGINE_MODEL,),
        "choice",
        choices=RUNTIMES,
    )
    device: str = _setting("auto", "auto (cuda when a GPU is visible, else cpu) | cpu | cuda | cuda:N", (ENGINE_MODEL,))
    dtype: str = _setting(
        "auto",
        "auto (fp32 on cpu, bf16 on cuda) | fp32 | bf16 | fp16 | fp8 (e4m3 trunk weights and activations, row scales; emulated on cpu)",
        (ENGINE_MODEL,),
        "choice",
        choices=DTYPES,
    )
    fp8_bf16_layers: int = _setting(
        0,
        "with dtype fp8, the first N decoder layers keep bf16 weights: their rounding errors are the ones every later "
        "layer amplifies (README, FP8)",
        (ENGINE_MODEL,),
        "int",
        minimum=0,
    )
    tensor_parallel: int = _setting(
        1, "ranks (GPUs: cuda:0..N-1; gloo processes on cpu) one engine splits the model over", (ENGINE_MODEL,), "int", minimum=1
    )
    engine_instances: int = _setting(
        1,
        "reward_engine instances, each a whole copy of the model (data parallelism): instance k runs on cuda:k*T..k*T+T-1 "
        "(T = tensor_parallel), round robin over the GPUs (instances sharing a GPU need memory_budget); reward-server sets "
        "Triton's instance count to it, plain tritonserver needs the same count in reward_engine's instance_group",
        (ENGINE_MODEL,),
        "int",
        minimum=1,
    )
    memory_budget: int | None = _setting(
        None,
        "bytes per rank for weights + one step: auto (free GPU memory; no plan on cpu) or a number; sizes auto max_step_tokens",
        (ENGINE_MODEL,),
        "auto_int",
        minimum=1,
    )
    max_step_tokens: int | None = _setting(
        None, "most tokens in one packed engine step: auto (2048 on cpu, 16384 on cuda) or a number", (ENGINE_MODEL,), "auto_int", minimum=1
    )
    min_shared_prefix: int = _setting(
        64, "sequences of one step sharing this many leading tokens compute them once; 0 = off", (ENGINE_MODEL,), "int", minimum=0
    )
    prefix_cache_tokens: int = _setting(
        0,
        "keys/values of prompt prefixes kept across requests (LRU, 64-token blocks), in tokens; 0 = off. On: attention "
        "in 64-token tiles, bit-identical cached or not; within 1e-4 of the engine with it off",
        (ENGINE_MODEL,),
        "int",
        minimum=0,
    )
    tile_rows: int | None = _setting(
        None,
        "rows of each linear layer's fixed tiles and the step's granularity (batch invariance): auto (GPU 256; CPU 64 where a "
        "layer's one call is proven at 64, else 256) or a number",
        (ENGINE_MODEL,),
        "auto_int",
        minimum=1,
    )
    attention: str = _setting(
        "auto",
        "auto (varlen where it runs, unless the prefix cache is on) | loop (one SDPA call per sequence) | varlen (one "
        "variable-length FlashAttention call per layer; CUDA GPUs, sm80+, bf16/fp16/fp8): README, How the engine runs a batch",
        (ENGINE_MODEL,),
        "choice",
        choices=("auto", "loop", "varlen"),
    )
    cuda_graphs: bool = _setting(
        False,
        "replay steps of up to 4,096 rows from CUDA graphs, every such step shape captured at load (needs attention varlen, "
        "tensor_parallel 1; larger steps and steps sharing a prompt run as before): fewer launches from Python "
        "(README, How the engine runs a batch)",
        (ENGINE_MODEL,),
        "bool",
    )
    scoring_thread: bool = _setting(
        False,
        "score on a thread of reward_engine's own: the next batch is read while a step runs, and batches that arrive during "
        "a step join the next (Triton's own reward_engine pending count and durations then end at the hand-off): "
        "docs/monitoring.md",
        (ENGINE_MODEL,),
        "bool",
    )
    max_tokens: int = _setting(4096, "longest templated conversation (tokens) scored", ALL, "int", minimum=1)
    max_bytes: int = _setting(
        1 << 20, "largest conversation accepted, in bytes (checked before parsing)", (PREPROCESSING_MODEL, NEMO_MODEL), "int", minimum=1
    )
    max_turns: int = _setting(256, "most turns in one conversation", (PREPROCESSING_MODEL,), "int", minimum=1)
    merge_attributes: bool = _setting(
        False, "nemo_reward_model answers [B, 1] rewards (the head's reward rule) instead of [B, N]", (NEMO_MODEL,), "bool"
    )

    @classmethod
    def resolve(cls, configs: Sequence[tuple[Path, Mapping[str, str]]], environ: Mapping[str, str] = os.environ) -> Settings:
        """Settings from the environment, then the `parameters` of each (model folder, parameters) in
        `configs`, first found wins, then the defaults. ValueError names the setting, where its value
        came from and what is wrong with it."""
        known = {f.name for f in fields(cls)}
        for folder, parameters in configs:
            unknown = sorted(set(parameters) - known)
            if unknown:
                raise ValueError(f"{folder / 'config.pbtxt'}: unknown setting(s) {unknown} in its parameters; known: {sorted(known)}")
        values = {}
        for f in fields(cls):
            env = ENV_PREFIX + f.name.upper()
            if environ.get(env):
                values[f.name] = parse(f.name, environ[env], f"${env}", Path.cwd())
                continue
            for folder, parameters in configs:
                if parameters.get(f.name, "") != "":
                    values[f.name] = parse(f.name, parameters[f.name], f"{folder / 'config.pbtxt'}: parameter {f.name}", folder)
                    break
        return cls(**values)

    @classmethod
    def for_model(cls, model_dir: str | Path, own: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> Settings:
        """Settings as the model in `model_dir` (Triton's args["model_repository"]) sees them; `own`:
        the parameters of its own config (reward_server.settings.model_parameters(args))."""
        folder = Path(model_dir).resolve()
        ensemble = folder.parent / ENSEMBLE_MODEL
        return cls.resolve([(folder, own), (ensemble, read_parameters(ensemble / "config.pbtxt"))], environ)

    def require_checkpoint(self) -> Path:
        if not self.checkpoint:
            raise ValueError(f"no checkpoint: set the ensemble's 'checkpoint' parameter, ${ENV_PREFIX}CHECKPOINT or --checkpoint")
        return Path(self.checkpoint)


def describe() -> list[tuple[str, str, Any, str, tuple[str, ...]]]:
    """(name, environment variable, default, help, models reading it) of every setting."""
    return [(f.name, ENV_PREFIX + f.name.upper(), f.default, f.metadata["help"], f.metadata["models"]) for f in fields(Settings)]


def setting_kind(name: str) -> str | None:
    """How a setting's text is read (path, int, choice, ...); None for no such setting."""
    return next((f.metadata["kind"] for f in fields(Settings) if f.name == name), None)


def parse(name: str, text: str, source: str, base: Path) -> Any:
    """One setting's value from its text; paths resolve against `base`."""
    meta = next(f.metadata for f in fields(Settings) if f.name == name)
    kind, value = meta["kind"], text.strip()
    if kind == "path":
        path = (base / value).resolve()
        if not path.is_dir():
            raise ValueError(f"{source}: folder {path} does not exist (run `make setup`, or point it at a checkpoint)")
        return str(path)
    if kind == "choice":
        if value not in meta["choices"]:
            raise ValueError(f"{source}: {value!r} is not one of {', '.join(meta['choices'])}")
        return value
    if kind == "bool":
        return parse_bool(value, source)
    if kind == "auto_int":
        return None if value == "auto" else parse_int(value, source, meta["minimum"])
    if kind == "int":
        return parse_int(value, source, meta["minimum"])
    return value


def parse_bool(value: str, source: str) -> bool:
    """The one meaning of a boolean setting."""
    lowered = value.strip().lower()
    if lowered in TRUE_STRINGS:
        return True
    if lowered in FALSE_STRINGS:
        return False
    raise ValueError(f"{source}: {value!r} is not a boolean (use true or false)")


def parse_int(value: str, source: str, minimum: int = 1) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{source}: {value!r} is not an integer") from None
    if number < minimum:
        raise ValueError(f"{source}: {number} is below the minimum {minimum}")
    return number


def model_parameters(args: Mapping[str, str]) -> dict[str, str]:
    """The `parameters` of the model config Triton hands a python model at initialize."""
    config = json.loads(args["model_config"])
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def read_parameters(config: Path) -> dict[str, str]:
    """The `parameters` of a config.pbtxt as a plain dict ({} when the file is absent)."""
    if not config.exists():
        return {}
    from google.protobuf import text_format  # with tritonclient's ModelConfig, a real parser of config.pbtxt
    from tritonclient.grpc import model_config_pb2

    parsed = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
    return {key: value.string_value for key, value in parsed.parameters.items()}
