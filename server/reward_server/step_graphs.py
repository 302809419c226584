"""`cuda_graphs: true`: a step's trunk forward replayed from a CUDA graph instead of launched from Python.

A decoder layer launches some 20 kernels from Python (norms, rotary, products, attention, activations,
residual adds); for a small step on a fast GPU that host work takes about as long as the kernels themselves
(README, Benchmark). A CUDA graph records a forward's kernels once and replays them with one launch. A graph
is made for a step shape: its rows (whole tiles, the engine's filler included) and a bucket of its segments
(a power of two from 8 to 128; the unused ones are empty, which FlashAttention's varlen kernel skips).
Every shape of up to MAX_ROWS rows is captured at load, none while serving: a capture stalls its step (on the
H200, long mixes whose shapes were captured as they came ran the server at 0.53x the engine in-process, 0.96x
without graphs), and a larger step waits for its kernels, not for their launches (a 2,631-token step of the
8B shape waited 79 of its 81 ms for the GPU). Larger steps, and steps of more segments, run from Python.
A replay copies the step's token ids, positions and segment bounds into its graph's input buffers. All graphs
share one memory pool and write their hidden states into one output buffer (one step runs at a time, and
each step's hidden states are read before the next replay), so that the graphs together hold one step's
memory of MAX_ROWS rows, not one each.

What can be captured: steps whose every layer runs the varlen kernel (`attention: varlen` or `auto` on a GPU;
no sliding windows or soft-capping), with nothing continued from earlier keys/values (a best-of-n group's
shared prompt, the prefix cache: those steps run as before, from Python). The varlen kernel is given the
graph's bounds and, as `max_q`/`max_k`, the longest segment any step of that shape can hold, which sizes its
grid only (varlen.py). Scores are the bits of the same step run from Python (the H200, 2026-11-27:
benchmarks/gpu_checks.py `--only graphs`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from reward_server import varlen

MIN_SEGMENTS, MAX_SEGMENTS = 8, 128
MAX_ROWS = 4096  # the largest step captured (its activations are the graphs' memory: memory plan)


def most_rows(tile: int) -> int:
    """The most rows a captured step may have with `tile`-row tiles: whole tiles up to MAX_ROWS, at least one."""
    return max(MAX_ROWS // tile, 1) * tile


def segment_bucket(segments: int) -> int:
    """The graph's number of segments for a step of `segments`: the next power of two, at least MIN_SEGMENTS."""
    return max(MIN_SEGMENTS, 1 << (segments - 1).bit_length())


def padded_bounds(lengths: list[int], segments: int) -> np.ndarray:
    """int32 [segments + 1]: where each of `lengths` starts in the packed row, then empty segments at its end."""
    bounds = np.full(segments + 1, sum(lengths), dtype=np.int32)
    bounds[: len(lengths) + 1] = np.cumsum([0, *lengths])
    return bounds


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # [1, rows] int64: the graph's input buffers, filled before each replay
    position_ids: torch.Tensor  # [1, rows] int64
    bounds: torch.Tensor  # [segments + 1] int32


class StepGraphs:
    """The trunk's forward over packed steps, captured per step shape at load and replayed. `forward(input_ids,
    position_ids, batch)` is the trunk's forward with the varlen bounds of `batch` (torch_runtime sets them
    around it); it returns the final hidden states [rows, hidden], which every graph copies into `output`
    [most rows, hidden]. Shapes: rows from `tile` to `output`'s in whole tiles, each with every segment bucket.
    `longest`: the longest segment a step may have (the varlen kernel's grid is sized for it). ValueError if
    the model cannot be captured. Everything runs on `output`'s device (made current around each call: a
    graph is captured on the current device, whatever device its kernels' tensors are on)."""

    def __init__(self, forward: Callable[..., torch.Tensor], output: torch.Tensor, longest: int, tile: int) -> None:
        self.forward, self.output, self.device, self.longest = forward, output, output.device, longest
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(self.device)  # the captures' (torch.cuda.graph's own is made on the current device)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.replays = 0  # steps run from a graph (the rest ran from Python)
        started = time.perf_counter()
        buckets = [1 << n for n in range(MIN_SEGMENTS.bit_length() - 1, MAX_SEGMENTS.bit_length())]
        try:
            # Largest first, as vLLM captures: the shared pool's blocks are then the largest shape's, which the smaller
            # ones reuse; smallest first, each larger capture would add blocks the earlier ones' cannot hold
            for rows in reversed(range(tile, len(output) + 1, tile)):
                for segments in reversed(buckets):
                    self.graphs[rows, segments] = self._capture(rows, segments)
        except RuntimeError as exc:
            raise ValueError(f"cuda_graphs: the model's forward cannot be captured in a CUDA graph: {exc}") from exc
        seconds = time.perf_counter() - started
        print(f"reward engine: cuda_graphs: {len(self.graphs)} step shapes captured in {seconds:.1f} s", file=sys.stderr, flush=True)

    def longest_segment(self, rows: int) -> int:
        """The longest segment a step of `rows` rows may hold: the varlen kernel's `max_q` and `max_k` there."""
        return max(2, min(rows, self.longest))

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor | None:
        """Final hidden states [rows, hidden] of a step (ids and positions [rows] on the host, `lengths` of its
        segments), replayed from its shape's graph; None where it has none (the caller runs the step from Python):
        more rows than `output` or segments than MAX_SEGMENTS, or a segment longer than `longest`."""
        rows = len(input_ids)
        made = self.graphs.get((rows, segment_bucket(len(lengths))))
        if made is None or max(lengths) > self.longest_segment(rows):
            return None
        with torch.cuda.device(self.device):
            made.input_ids[0].copy_(input_ids)
            made.position_ids[0].copy_(position_ids)
            made.bounds.copy_(torch.from_numpy(padded_bounds(lengths, made.bounds.numel() - 1)))
            made.graph.replay()
        self.replays += 1
        return self.output[:rows]

    @torch.inference_mode()
    def _capture(self, rows: int, segments: int) -> _Graph:
        """The graph of a step of `rows` rows and `segments` segments, captured after one warm-up run on a side
        stream (cuBLAS's workspaces and lazy initialisations stay out of the graph)."""
        longest = self.longest_segment(rows)
        made = _Graph(
            torch.cuda.CUDAGraph(),
            torch.zeros((1, rows), dtype=torch.int64, device=self.device),
            torch.zeros((1, rows), dtype=torch.int64, device=self.device),
            torch.zeros(segments + 1, dtype=torch.int32, device=self.device),
        )
        # the warm-up's bounds: segments of at most `longest` rows (any valid bounds do)
        warm = [min(longest, rows - start) for start in range(0, rows, longest)][:segments]
        made.bounds.copy_(torch.from_numpy(padded_bounds(warm, segments)))
        batch = varlen.VarlenBatch(made.bounds, made.bounds, longest, longest)
        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.forward(made.input_ids, made.position_ids, batch)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            # thread_local: other threads of the stub may call CUDA meanwhile
            with torch.cuda.graph(made.graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                self.output[:rows].copy_(self.forward(made.input_ids, made.position_ids, batch))
        return made
