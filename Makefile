# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CHECKPOINT ?= .build/demo-checkpoint
STEERLM_CHECKPOINT ?= .build/steerlm-checkpoint
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=

.PHONY: setup serve test lint format bench engine fuzz soak clean

setup: $(VENV)/.installed $(CHECKPOINT)/model.safetensors $(STEERLM_CHECKPOINT)/model.safetensors ## virtualenv, dependencies, demo checkpoints

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps rewardbench==0.1.4
	touch $@

$(CHECKPOINT)/model.safetensors: build/demo_checkpoint.py build/llama31_chat_template.jinja $(VENV)/.installed
	$(PY) build/demo_checkpoint.py --out $(CHECKPOINT)

# Optional: ADMIN_KEY_FILE=... (explicit model control, restricted to the key in that file; or $$REWARD_ADMIN_KEY),
# TLS_CERT=... TLS_KEY=... [TLS_CLIENT_CA=...], SERVE_ARGS="--max-tokens 8192 ..." (any `reward-server` flag).
SERVE_OPTIONS = $(if $(ADMIN_KEY_FILE),--admin-key-file $(ADMIN_KEY_FILE)) $(if $(TLS_CERT),--tls-cert $(TLS_CERT) --tls-key $(TLS_KEY)) $(if $(TLS_CLIENT_CA),--tls-client-ca $(TLS_CLIENT_CA))
serve: setup ## start tritonserver on the model repository (HTTP 8000, gRPC 8001, metrics 8002)
	@echo "Try: $(PY) -c \"from reward_client import RewardClient; print(RewardClient('localhost:$(GRPC_PORT)').score([{'role':'user','content':'What is 1+1?'},{'role':'assistant','content':'1+1=2'}]))\""
	$(VENV)/bin/reward-server --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) $(SERVE_OPTIONS) $(SERVE_ARGS)

# A NeMo-Aligner-style checkpoint (SteerLM template, 9-attribute head) for the tests and `REWARD_CHECKPOINT=`.
$(STEERLM_CHECKPOINT)/model.safetensors: build/demo_checkpoint.py build/steerlm_chat_template.jinja $(CHECKPOINT)/model.safetensors
	$(PY) build/demo_checkpoint.py --layout steerlm --tokenizer-from $(CHECKPOINT) --out $(STEERLM_CHECKPOINT)

# A real Prometheus for the metrics tests: Debian's package, unpacked here (no root, no system change).
PROMETHEUS := .build/prometheus/usr/bin/prometheus
$(PROMETHEUS):
	mkdir -p .build/prometheus
	cd .build && (apt-get download prometheus || (echo 'make test needs apt-get with a Debian mirror to fetch prometheus (apt-get update)' >&2; false)) \
	  && dpkg -x prometheus_*.deb prometheus && rm prometheus_*.deb
	$(PROMETHEUS) --version | head -1

test: setup $(PROMETHEUS) ## the whole suite; end-to-end tests start their own tritonserver on free ports
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

fuzz: setup $(PROMETHEUS) ## 10,000 property-based inputs against a live server, and per-turn positions against every cut (make test runs 300)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-10000} $(PY) -m pytest tests/test_fuzz.py tests/test_turn_cuts.py -q --hypothesis-show-statistics

soak: setup ## 60 s at concurrency 64 against a fresh server: 0 errors, memory flat within 10 %
	$(PY) -m benchmarks.soak $(SOAK_ARGS)

# TensorRT-LLM engine (run inside NVIDIA's tritonserver:<yy.mm>-trtllm-python-py3 container, whose
# python has tensorrt_llm): make engine CHECKPOINT=/models/... TP=8 DTYPE=bf16|fp8 ENGINE=/engines/...
ENGINE ?= .build/engine
TP ?= 1
DTYPE ?= bf16
ENGINE_ARGS ?=
engine: ## convert + build a TensorRT-LLM reward engine (docs/tensorrt-llm.md)
	$(PYTHON) build/trtllm_engine.py --checkpoint $(CHECKPOINT) --out $(ENGINE) --tp $(TP) --dtype $(DTYPE) $(ENGINE_ARGS)

BENCH_CHECKPOINT ?= .build/bench-checkpoint
BENCH_ARGS ?=
$(BENCH_CHECKPOINT)/model.safetensors: build/demo_checkpoint.py $(VENV)/.installed
	$(PY) build/demo_checkpoint.py --preset bench --out $(BENCH_CHECKPOINT)

bench: setup $(BENCH_CHECKPOINT)/model.safetensors ## side-by-side throughput (see benchmarks/benchmark.py)
	$(PY) -m benchmarks.benchmark --checkpoint $(BENCH_CHECKPOINT) $(BENCH_ARGS)

clean:
	rm -rf .build
