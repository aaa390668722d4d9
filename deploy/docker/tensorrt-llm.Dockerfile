# Parley on NVIDIA GPUs through TensorRT-LLM: `docker build -f deploy/docker/tensorrt-llm.Dockerfile .`
# Built on NVIDIA's TensorRT-LLM release image (PyTorch backend). There is no 1.3 GA yet; llm-d pins
# this release candidate too. Override TRTLLM_IMAGE to move.
ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.3.0rc18
FROM ${TRTLLM_IMAGE}
RUN useradd --uid 10001 --create-home parley || true
WORKDIR /app
COPY --chown=10001 . /app
USER 10001
# The venv sees the image's tensorrt_llm (system site-packages); Parley's own pins (grpcio,
# protobuf) are installed inside it and win there. llama-cpp-python is still built (CPU only):
# Parley's grammar compiler uses its JSON-schema converter for both engines.
RUN python3 -m venv --system-site-packages .venv \
    && CMAKE_ARGS="-DGGML_NATIVE=OFF" .venv/bin/pip install --no-cache-dir -e . \
    && touch .venv/.parley-installed \
    && make proto
ENV PARLEY_ENGINE=tensorrt_llm PARLEY_MODEL_PATH=/models/model \
    PARLEY_GRPC_HOST=0.0.0.0 PARLEY_HTTP_HOST=0.0.0.0 PARLEY_METRICS_HOST=0.0.0.0 \
    PARLEY_MAX_CONCURRENT_GENERATIONS=256 PARLEY_LOG_FORMAT=json
EXPOSE 8080 50051 9464
ENTRYPOINT ["/app/.venv/bin/parley"]
CMD ["serve"]
