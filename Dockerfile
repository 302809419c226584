# Image of the `torch` runtime (the verified one): NVIDIA's Triton 24.10 container (tritonserver 2.51 and
# its python backend, Ubuntu 22.04, Python 3.10) with this repository's `server-core` extra (CUDA torch
# 2.13.0, transformers 5, numpy<2) in the container's Python, started by the `reward-server` launcher
# (supervisor, admin key, TLS front). TensorRT-LLM engines have their own image: Dockerfile.trtllm.
#
#   docker build -t reward-model-server .
#   docker run --gpus all --shm-size 8g -p 8000-8002:8000-8002 \
#       -v /models/Llama-3.1-Nemotron-70B-Reward-HF:/models/checkpoint:ro reward-model-server
#
# Arguments after the image name are `reward-server` flags (`--max-tokens 8192`, `--admin-key-file F`,
# `--tls-cert C --tls-key K`); the admin key may also come as -e REWARD_ADMIN_KEY. docs/deployment.md.
# Unverified: no Docker engine and no NGC access on this project's machines; the install line below
# was resolved for Python 3.10 / manylinux x86_64 against PyPI (docs/deployment.md, "The images").
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}

WORKDIR /opt/reward-model
COPY pyproject.toml README.md ./
COPY client/ client/
COPY server/ server/
COPY model_repository/ model_repository/

# PyPI's torch 2.13.0 for Linux x86_64 is the CUDA 13.0 build (its nvidia-* wheels; host driver >= 580).
# For an older driver, name a CUDA 12 build of torch 2.13.0 from PyTorch's own index in TORCH_INDEX_URL
# (e.g. its cu126 folder): installed first, it satisfies the extra's torch==2.13.0 pin. No
# nvidia-pytriton: the container's own tritonserver serves. The build fails under numpy 2.
ARG TORCH_INDEX_URL=
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0; fi \
 && pip install --no-cache-dir ".[server-core]" \
 && python3 -c "from reward_server.compat import check_numpy; check_numpy(); import torch, transformers"

# A transformers reward checkpoint: mounted at /models/checkpoint, which the image's own repository names
# (--checkpoint or $REWARD_CHECKPOINT override it). Its config parameters, not $REWARD_*: a repository given
# with --model-repository keeps its own settings.
RUN python3 -c "from reward_server.launcher.repository import set_parameters; \
set_parameters('model_repository/reward_model/config.pbtxt', {'checkpoint': '/models/checkpoint', 'runtime': 'torch'})"

# The library that keeps keys out of tritonserver's command line (docs/security.md, "No key on a command
# line"), built with a C compiler into .build/triton/ under the WORKDIR, where the launcher finds it.
RUN (command -v cc || (apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*)) \
 && python3 -c "from reward_server.launcher.argv_secrets import build_library; print(build_library())"

EXPOSE 8000 8001 8002
# nvidia_entrypoint.sh (the base image's entrypoint) sets up CUDA compatibility, then runs the launcher
# with the container's tritonserver and backends; `docker run IMAGE FLAGS` / Kubernetes `args` add flags.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "reward-server", "--tritonserver", "/opt/tritonserver/bin/tritonserver", \
            "--backend-directory", "/opt/tritonserver/backends", "--model-repository", "/opt/reward-model/model_repository"]
CMD []
