#!/usr/bin/env bash
# GPU smoke test inside the TensorRT-LLM image (deploy/docker/tensorrt-llm.Dockerfile):
#   docker run --gpus all --shm-size 8g -v /path/to/models:/models parley-trtllm \
#     deploy/gpu/smoke.sh /models/Qwen2.5-0.5B-Instruct
# Starts Parley (TensorRT-LLM engine + Envoy), waits until it serves, runs deploy/gpu/smoke.py
# (streaming, a tool call, structured output; TTFT and tokens/s), stops it. Nothing here could
# run on the machines Parley is developed on (no GPU): see the README.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL_PATH=${1:-${PARLEY_MODEL_PATH:?give a Hugging Face checkpoint directory}}
PORT=${PARLEY_HTTP_PORT:-8080}
PY=${PY:-.venv/bin/python}
export PARLEY_ENGINE=tensorrt_llm PARLEY_MODEL_PATH="$MODEL_PATH" PARLEY_HTTP_PORT="$PORT"
export PARLEY_MODEL_NAME=${PARLEY_MODEL_NAME:-$(basename "$MODEL_PATH")}
export PARLEY_STORE_PATH=${PARLEY_STORE_PATH:-$(mktemp -d)/parley.sqlite3}
export PARLEY_MAX_CONCURRENT_GENERATIONS=${PARLEY_MAX_CONCURRENT_GENERATIONS:-64}
.venv/bin/parley run &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
echo "==> waiting for Parley on :$PORT (model loading takes a while)"
for _ in $(seq 1 600); do
  if curl -fsS "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1; then break; fi
  kill -0 $server 2>/dev/null || { echo "Parley exited during start-up"; exit 1; }
  sleep 1
done
"$PY" deploy/gpu/smoke.py --base-url "http://127.0.0.1:$PORT/v1" --model "$PARLEY_MODEL_NAME"
