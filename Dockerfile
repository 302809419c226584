# Production image: NVIDIA's Triton + TensorRT-LLM container with this repository, serving an engine
# (or a transformers checkpoint) from a mounted volume. TensorRT-LLM 1.0 is in the 25.10 image.
#
#   docker build -t reward-model-server .
#   docker run --gpus all --shm-size 8g -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -v /engines/nemotron-70b-rm-fp8:/models/engine:ro reward-model-server
#
# Unverified here: no Docker engine and no NGC access on this project's machines (docs/tensorrt-llm.md).
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3
FROM ${TRITON_IMAGE}

WORKDIR /opt/reward-model
COPY pyproject.toml README.md ./
COPY client/ client/
COPY build/ build/
COPY model_repository/ model_repository/

# The container's torch, transformers and tensorrt_llm stay as NVIDIA pinned them: the project goes
# in without its dependencies, plus the few the python models need that the image lacks.
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir "tritonclient[grpc,http]>=2.51" aiohttp tqdm jinja2 safetensors

# The engine folder built by `make engine` (it carries the tokenizer and reward_head.json).
ENV REWARD_CHECKPOINT=/models/engine \
    REWARD_RUNTIME=tensorrt_llm
EXPOSE 8000 8001 8002
# Under build/supervisor.py: Triton does not restart a python-backend stub that died; the supervisor
# restarts the server then (docs/security.md, "Faults"). CMD holds tritonserver's flags (Kubernetes
# `args` replace them).
ENTRYPOINT ["python3", "/opt/reward-model/build/supervisor.py", "--http", "http://127.0.0.1:8000", "--", "tritonserver"]
CMD ["--model-repository=/opt/reward-model/model_repository", "--model-control-mode=none", "--strict-readiness=true", \
     "--allow-metrics=true", "--metrics-config=summary_latencies=true"]
