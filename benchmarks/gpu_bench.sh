#!/usr/bin/env bash
# `make bench` on one GPU with no network, in one command (run on an H200: README, Benchmark):
#
#   benchmarks/gpu_bench.sh OUT [WHEELS]
#
# OUT: folder for bench-gpu.json, the log and one engine step's profiler trace (step-trace.json).
# WHEELS: folder made by ../shared/gpu/wheels.sh (numpy 1.26.4, tritonclient and its HTTP dependencies) plus
# pytriton/ + nvidia_pytriton.libs/ folders: needed where the machine lacks tritonclient (the server package imports
# reward_client's wire contract, and reward_client imports tritonclient); its pytriton folders run the server rows (d),
# without them (a)-(c) only. Needs, carried with the tree: .build/demo-checkpoint (its tokenizer).
# What it does, in about 7 minutes on an H200 (measured; the checkpoint's build ≈ 1 of them): builds the Llama-3.1-8B-shape random
# checkpoint in bf16 (/tmp/rm-8b, kept between runs), runs benchmarks/gpu_checks.py, then
# benchmarks/benchmark.py on the long, short, best-of-8 and rlhf workloads side by side, then one profiled
# engine step of the long mix.
# CUDA_GRAPHS=1 runs (c) and (d) with cuda_graphs on (with WORKLOADS not naming rlhf). benchmarks/server_settings.py compares
# server settings on one mix.
# REWARD_* variables reach the server rows (d): REWARD_ENGINE_INSTANCES=2 REWARD_MEMORY_BUDGET=38000000000
# runs two engine instances sharing the GPU (one computes while the other waits on its requests).
# OVERHEAD_ROUNDS (default 0) adds benchmarks/gateway_overhead.py's rounds. DEVICE, DTYPE, PRESET,
# CHECKPOINT and TOKENIZER override the GPU defaults (a CPU dry run of this script:
# DEVICE=cpu DTYPE=fp32 PRESET=bench CHECKPOINT=/tmp/rm-dry benchmarks/gpu_bench.sh /tmp/dry).
set -euo pipefail
out=${1:?folder for the results}
wheels=${2:-}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
cd "$repo"
python=${PYTHON:-python3}
device=${DEVICE:-cuda} dtype=${DTYPE:-bf16} preset=${PRESET:-llama8b}
checkpoint=${CHECKPOINT:-/tmp/rm-8b} tokenizer=${TOKENIZER:-.build/demo-checkpoint}
site=$("$python" -c 'import site; print(site.getsitepackages()[0])')

if [ -n "$wheels" ]; then  # the python-backend stub ignores PYTHONPATH: install into that Python's site-packages
  "$python" -m pip install -q --no-index --no-deps --no-compile --force-reinstall "$wheels"/numpy-*.whl
  "$python" -m pip uninstall -y -q scipy scikit-learn || true  # they need numpy 2; transformers imports them
  "$python" -m pip install -q --no-index --no-deps --no-compile "$wheels"/*.whl
  [ -d "$wheels/pytriton" ] && cp -r "$wheels/pytriton" "$wheels/nvidia_pytriton.libs" "$site/"
fi
printf '%s\n%s\n%s\n' "$repo/server" "$repo/client" "$repo" > "$site/reward-project.pth"
bin=$(dirname "$(command -v "$python")")
# start_server runs the `reward-server` console command beside the interpreter
[ -x "$bin/reward-server" ] || printf '#!%s\nfrom reward_server.launcher.serve import main\nmain()\n' "$(command -v "$python")" > "$bin/reward-server"
chmod +x "$bin/reward-server"

if [ ! -f "$checkpoint/demo_checkpoint.json" ]; then  # written last: a build cut short is built again
  "$python" build/demo_checkpoint.py --preset "$preset" --device "$device" --dtype "$dtype" --tokenizer-from "$tokenizer" --out "$checkpoint"
fi
# CHECKS=0 skips what a CPU cannot check (benchmarks/gpu_checks.py: batch invariance per configuration, the
# products' probes and speed, the prefix cache's bits, CUDA graphs against none; CHECKS=graphs runs that check alone, any --only list);
# BENCH=0 skips the bench and the profiled step.
checks=${CHECKS:-1}
if [ "$checks" != 0 ]; then
  [ "$checks" = 1 ] && checks=invariance,cache,products,graphs
  "$python" -m benchmarks.gpu_checks $([ "$device" = cpu ] && echo --cpu-dry-run) --only "$checks" --checkpoint "$checkpoint" --out "$out/gpu-checks.json" 2>&1 | tee "$out/checks.log"
fi
[ "${BENCH:-1}" = 1 ] || exit 0
server=()
# the launcher needs pytriton's files (tritonserver, the stub), not its Python package (which imports zmq)
"$python" -c 'import importlib.util, tritonclient.grpc; assert importlib.util.find_spec("pytriton")' || server=(--no-server)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" || true
"$python" -m benchmarks.benchmark --checkpoint "$checkpoint" --device "$device" --dtype "$dtype" --workloads "${WORKLOADS:-long,short,best-of-8,rlhf}" \
  --rlhf-prompts "${RLHF_PROMPTS:-4}" "${server[@]}" $([ "${CUDA_GRAPHS:-0}" = 1 ] && echo --cuda-graphs) --out "$out/bench-gpu.json" 2>&1 |
  tee "$out/bench.log"
# OVERHEAD_ROUNDS=N (with the server): the HTTP gateway's and the gRPC front's cost against direct gRPC (issue 15)
if [ "${OVERHEAD_ROUNDS:-0}" -gt 0 ] && [ ${#server[@]} -eq 0 ]; then
  "$python" -m benchmarks.gateway_overhead --checkpoint "$checkpoint" --device "$device" --dtype "$dtype" --rounds "$OVERHEAD_ROUNDS" 2>&1 |
    tee "$out/overhead.log"
fi

[ "${PROFILE:-1}" = 1 ] || exit 0  # PROFILE=0 skips the profiled step
"$python" - "$out" "$checkpoint" "$device" "$dtype" <<'EOF'
# One engine step of the long mix under torch.profiler: where a step's time goes (host syncs, attention
# calls per layer, tiling, copies). Open step-trace.json in Perfetto or chrome://tracing.
import sys

import numpy as np
import torch
from transformers import AutoTokenizer

from benchmarks.benchmark import WorkloadMaker
from reward_server.runtimes.torch_runtime import TorchRewardEngine

out, checkpoint, device, dtype = sys.argv[1:5]
engine = TorchRewardEngine(checkpoint, device=device, dtype=dtype)
maker = WorkloadMaker(AutoTokenizer.from_pretrained(checkpoint), seed=2024)
ids = [np.array(maker.tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in maker.mix(16, 100, 3000)]
gpu = device.startswith("cuda")
engine.score(ids)
if gpu:
    torch.cuda.synchronize()
activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
with torch.profiler.profile(activities=activities) as profile:
    engine.score(ids)
    if gpu:
        torch.cuda.synchronize()
profile.export_chrome_trace(f"{out}/step-trace.json")
print(profile.key_averages().table(sort_by="cuda_time_total" if gpu else "cpu_time_total", row_limit=25))
# What the host does per decoder layer: kernels launched (a GPU) and operators dispatched.
launches = sum(e.count for e in profile.key_averages() if "LaunchKernel" in e.key)
steps, layers = len(engine.plan(ids)), engine.trunk.config.num_hidden_layers
operators = sum(e.count for e in profile.key_averages() if e.key.startswith("aten::"))
print(f"per layer and step: {launches / steps / layers:.1f} kernel launches, {operators / steps / layers:.1f} aten operators (nested included)")
EOF
