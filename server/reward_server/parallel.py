"""Tensor parallelism (`tensor_parallel: N`): one engine drives N ranks, one per device.

The split (Megatron's, hand-written: transformers' own tp_plan needs accelerate and installs its
hooks on nn.Linear instances, which the fixed-tile layers of invariance.py replace):
- column-parallel: q_proj, k_proj, v_proj keep the rows of this rank's heads; gate_proj, up_proj
  keep 1/N of the MLP's rows. With fewer KV heads than ranks (GQA), each rank keeps the one KV head
  its query heads use (replicated across ranks); N must then be a multiple of the KV heads;
- row-parallel: o_proj and down_proj keep the matching input columns; their partial outputs are
  summed across ranks once after attention and once after the MLP (`ordered_all_reduce`);
- embeddings, norms, rotary and the reward head are replicated; the packed attention gets local heads.

Batch invariance: a ring all_reduce sums each element in an order that depends on which chunk of the
message it falls in, so on N >= 3 ranks a row's sum would depend on the batch (measured on gloo).
`ordered_all_reduce` sums in rank order instead, at the traffic of a ring all_reduce: an all_to_all
gives each rank 1/N of the columns of every rank's partial, it sums them rank 0 first, and an
all_gather assembles the rows.

Processes: the engine (the Triton stub, or a test) starts N worker processes, ranks 0..N-1, and
holds no weights itself. Each step's inputs go to every rank through its own pipe; every rank runs
the same packed forward; rank 0 answers with the head's outputs. The engine's plan asks the ranks
which leading blocks their prefix caches hold (`reserve`: every rank holds them, rank 0 answers).
A rank that dies ends the group: the others fail in their next collective, the engine raises
EngineError and, in a server (`exit_on_failure`), exits so that the supervisor restarts tritonserver.
Workers end with their engine (`close`, or the pipe closing when the engine process dies).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from reward_server.errors import EngineError

READY_TIMEOUT_S = 1800  # loading a 70B checkpoint from disk takes minutes
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name torch 2.13 prefers; 2.11's


def ordered_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of x [..., H], each element summed in rank order (batch invariant)."""
    world = dist.get_world_size()
    width = x.shape[-1]
    if width % world:
        raise ValueError(f"hidden size {width} is not divisible by tensor_parallel {world}")
    rows = x.reshape(-1, width)
    send = rows.view(rows.shape[0], world, width // world).transpose(0, 1).contiguous()  # [world, T, H/world]
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send)  # received[r]: rank r's partial of this rank's columns
    total = received[0].float()
    for r in range(1, world):
        total = total + received[r].float()
    gathered = send.new_empty(world * rows.shape[0], width // world)  # the ranks' columns, one after another
    _all_gather(gathered, total.to(x.dtype).contiguous())
    return gathered.view(world, rows.shape[0], width // world).transpose(0, 1).reshape(x.shape)


class RowParallel(nn.Module):
    """A linear layer holding some input columns: local product, ordered sum across ranks, bias once."""

    def __init__(self, linear: nn.Linear, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.linear = linear
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = ordered_all_reduce(self.linear(x))
        return out if self.bias is None else out + self.bias


# this rank's part of a trunk parameter: (name within the trunk, dim, start, count) -> the tensor
SliceReader = Callable[[str, int, int, int], torch.Tensor]


def _cut(tensor: torch.Tensor, dim: int, start: int, count: int) -> torch.Tensor:
    return tensor.narrow(dim, start, count).clone()  # own storage: the whole tensor can be freed


def _keep_rows(linear: nn.Linear, name: str, start: int, count: int, read: SliceReader | None) -> None:
    for field in ("weight", "bias"):
        if getattr(linear, field) is not None:
            part = read(f"{name}.{field}", 0, start, count) if read else _cut(getattr(linear, field).data, 0, start, count)
            setattr(linear, field, nn.Parameter(part, requires_grad=False))
    linear.out_features = count


def _row_parallel(linear: nn.Linear, name: str, start: int, count: int, read: SliceReader | None) -> RowParallel:
    bias = None
    if linear.bias is not None:  # added once, after the sum
        bias = read(f"{name}.bias", 0, 0, linear.out_features) if read else linear.bias.data.clone()
    local = nn.Linear(count, linear.out_features, bias=False, dtype=linear.weight.dtype, device=linear.weight.device)
    part = read(f"{name}.weight", 1, start, count) if read else _cut(linear.weight.data, 1, start, count)
    local.weight = nn.Parameter(part, requires_grad=False)
    return RowParallel(local, bias)


def shard_plan(config, world: int) -> tuple[int, int, int]:
    """(query heads, KV heads, MLP rows) per rank; ValueError when `world` cannot split this model."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = config.intermediate_size
    problems = [f"{name} {n}" for name, n in (("attention heads", heads), ("MLP size", inter)) if n % world]
    if problems:
        raise ValueError(f"tensor_parallel {world}: {', '.join(problems)} not divisible by {world}")
    if kv % world and world % kv:
        raise ValueError(f"tensor_parallel {world}: {kv} KV heads can be neither split across nor replicated on {world} ranks")
    return heads // world, max(kv // world, 1), inter // world


SHARDED = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("up_proj", "down_proj")}


def decoder_layers(trunk: nn.Module) -> nn.ModuleList:
    """The trunk's decoder layers, where the transformers LMs the torch runtime serves keep them; ValueError
    for another layout (GPT-2's `h`): the runtime's swaps and shards walk `layers`."""
    layers = getattr(trunk, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(trunk).__name__} keeps its decoder layers elsewhere than `layers`, where the transformers LMs the torch "
            "runtime serves keep them (Llama, Mistral, Qwen, Gemma, Phi, Nemotron, ...)"
        )
    return layers


def shard_trunk(trunk: nn.Module, rank: int, world: int, read: SliceReader | None = None) -> nn.Module:
    """Keep this rank's part of every decoder layer (see the module docstring): cut from the loaded
    weights, or, with `read`, read from the checkpoint into a trunk whose weights are not loaded
    (rank_loading.py: each rank reads only its part)."""
    config = trunk.config
    q_heads, kv_heads, mlp_rows = shard_plan(config, world)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    first_q = rank * q_heads
    first_kv = first_q // group  # the KV head of this rank's first query head
    for index, layer in enumerate(decoder_layers(trunk)):
        missing = [f"{part}.{name}" for part, names in SHARDED.items() for name in names if not hasattr(getattr(layer, part, None), name)]
        if missing:
            raise ValueError(
                f"tensor_parallel {world}: {type(layer).__name__} has no {', '.join(missing)}, the layers the torch runtime "
                "splits across ranks; serve this architecture with tensor_parallel 1"
            )
        attention, mlp = layer.self_attn, layer.mlp
        prefix = f"layers.{index}"
        _keep_rows(attention.q_proj, f"{prefix}.self_attn.q_proj", first_q * head_dim, q_heads * head_dim, read)
        for name in ("k_proj", "v_proj"):
            _keep_rows(getattr(attention, name), f"{prefix}.self_attn.{name}", first_kv * head_dim, kv_heads * head_dim, read)
        attention.o_proj = _row_parallel(attention.o_proj, f"{prefix}.self_attn.o_proj", first_q * head_dim, q_heads * head_dim, read)
        for name in ("gate_proj", "up_proj"):  # Nemotron's MLP has no gate
            if hasattr(mlp, name):
                _keep_rows(getattr(mlp, name), f"{prefix}.mlp.{name}", rank * mlp_rows, mlp_rows, read)
        mlp.down_proj = _row_parallel(mlp.down_proj, f"{prefix}.mlp.down_proj", rank * mlp_rows, mlp_rows, read)
    return trunk


def rank_device(device: str, index: int) -> str:
    """The index-th GPU this process sees (CUDA_VISIBLE_DEVICES picks them), round robin, for `device` auto
    or cuda: rank r of the engine instance k of tensor_parallel T runs on index k*T + r (instances.py), so
    instances share the GPUs once there are more ranks than GPUs; a CPU is shared."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:"):
        raise ValueError(
            f"device {device}: with tensor_parallel or engine_instances > 1 use device cuda (ranks and instances take "
            "cuda:0, 1, ... in turn) and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if device != "cuda":
        return device
    if not torch.cuda.device_count():
        raise ValueError("device cuda: this process sees no GPU")
    return f"cuda:{index % torch.cuda.device_count()}"


def _python() -> str:
    """An interpreter for the workers: a Triton stub's sys.executable is the stub binary."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    return str(Path(sys.exec_prefix) / "bin" / "python3")


class RankGroup:
    """The engine's handle on its N worker processes."""

    def __init__(self, world: int, options: dict[str, Any], exit_on_failure: bool = False) -> None:
        # A rank lost before the group is ready fails the load (an error Triton reports), never exits the process
        self.world, self.exit_on_failure = world, False
        self.failure: str | None = None
        self._closing = threading.Event()
        self._close_lock = threading.Lock()  # the watcher thread and the caller may both close
        self._closed = False
        # A fork server imports torch and transformers once; each rank is then a cheap fork of it
        # (never a fork of this process, which may hold CUDA or a Triton stub's threads).
        context = get_context("forkserver")
        context.set_executable(_python())
        context.set_forkserver_preload(["reward_server.runtimes.torch_runtime"])
        store = Path(tempfile.mkdtemp(prefix="reward-tp-")) / "store"
        self.connections, self.processes = [], []
        for rank in range(world):
            ours, theirs = context.Pipe()
            arguments = (rank, world, str(store), options, theirs)
            process = context.Process(target=worker_main, args=arguments, daemon=True, name=f"reward-tp{rank}")
            process.start()
            theirs.close()
            self.connections.append(ours)
            self.processes.append(process)
        try:
            self.info = [self._receive(rank, READY_TIMEOUT_S, watch_all=False) for rank in range(world)]
        except BaseException:
            self.close()
            raise
        finally:
            store.unlink(missing_ok=True)
            store.parent.rmdir()
        self.exit_on_failure = exit_on_failure
        threading.Thread(target=self._watch, daemon=True, name="reward-tp-watch").start()
        atexit.register(self.close)  # before multiprocessing's own exit handler ends the ranks: not a failure

    def _receive(self, rank: int, timeout: float | None = None, watch_all: bool = True) -> Any:
        """Rank `rank`'s next answer; EngineError (ValueError for a load error) if the group broke.
        During a step any rank's death ends the wait (rank 0 would wait in a collective)."""
        connection = self.connections[rank]
        watched = self.processes if watch_all else [self.processes[rank]]
        ready = wait([connection, *(p.sentinel for p in watched)], timeout)
        if connection not in ready:
            dead = [(r, p.exitcode) for r, p in enumerate(self.processes) if not p.is_alive()]
            self._fail(f"tensor-parallel rank(s) died (rank, exit code): {dead}" if dead else "tensor-parallel ranks did not answer")
        try:
            kind, payload = connection.recv()
        except EOFError:
            self._fail(f"tensor-parallel rank {rank} died")
        if kind == "load_error":
            raise ValueError(payload)
        if kind == "error":
            self._fail(f"tensor-parallel rank {rank} failed: {payload}")
        return payload

    def _fail(self, message: str):
        """The group is broken for good. A server's engine exits at once, in the middle of the request,
        as a stub that was killed would (clients retry that); answering the request with an error would
        make it look like the request's own fault."""
        self.failure = self.failure or message
        if self.exit_on_failure:
            print(f"reward engine: {self.failure}; exiting so that the server restarts", file=sys.stderr, flush=True)
            os._exit(1)
        self.close()
        raise EngineError(self.failure)

    def _watch(self) -> None:
        """A rank that dies outside a step (killed, out of memory) ends the engine too."""
        wait([p.sentinel for p in self.processes])
        if not self._closing.is_set():
            with contextlib.suppress(EngineError):
                self._fail("a tensor-parallel rank died")

    def call(self, method: str, *arguments) -> Any:
        """Every rank's engine runs its `method` on the same arguments; rank 0's answer, with its cache
        counters and device wait after it (a step's)."""
        if self.failure:
            raise EngineError(self.failure)
        for connection in self.connections:
            try:
                connection.send((method, arguments))
            except OSError:
                self._fail("a tensor-parallel rank died")
        return self._receive(0)

    def close(self) -> None:
        self._closing.set()
        with self._close_lock:
            if self._closed:
                return  # closing a pipe twice would close whatever file reused its descriptor
            self._closed = True
            self._close()

    def _close(self) -> None:
        for connection in self.connections:
            try:
                connection.send(("stop", None))
            except OSError:
                pass  # that rank is gone already
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self.connections:
            connection.close()


def worker_main(rank: int, world: int, store: str, options: dict[str, Any], connection) -> None:
    """One rank: join the group, load this rank's shard, then run every step the engine sends."""
    from reward_server.runtimes.torch_runtime import TorchRewardEngine

    device = rank_device(options.get("device", "auto"), options.get("first_device", 0) + rank)  # checked by the engine
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(device)
    else:  # the ranks (of every engine instance) share the CPU's cores
        torch.set_num_threads(options.get("threads") or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        engine = TorchRewardEngine(**{**options, "device": device, "first_device": 0}, tensor_parallel=world, rank=rank)
    except Exception as exc:  # the engine's own load error, as one device's would be (not "rank 0 died")
        connection.send(("load_error", str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"))
        return
    info = dict(vocab_size=engine.vocab_size, spec=engine.spec, pad_token=engine.pad_token, max_step_tokens=engine.max_step_tokens)
    info.update(cached_token_cost=engine.cached_token_cost)
    connection.send(("ready", info))
    while True:
        try:
            kind, arguments = connection.recv()
        except EOFError:  # the engine's process is gone
            os._exit(0)
        if kind == "stop":
            break
        try:
            answer = getattr(engine, kind)(*arguments)  # score_step, or a plan's reserve
        except Exception:  # the other ranks may wait in a collective: end the whole group
            connection.send(("error", traceback.format_exc()))
            os._exit(1)
        if rank == 0:  # every rank's cache keys, hits and evicts alike: rank 0's counters stand for all
            connection.send(("ok", (answer, engine.cache_counters, engine.device_wait)))
    dist.destroy_process_group()
