# Parley on the CPU default (SmolLM2 via llama.cpp, SQLite): `docker build -f deploy/docker/cpu.Dockerfile .`
# Runs `parley run` (gRPC server + Envoy REST sidecar in one container) unless told otherwise;
# in Kubernetes the pod runs `parley serve` with Envoy as its own container.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake make \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --create-home parley
WORKDIR /app
COPY --chown=parley . /app
USER parley
# A portable llama.cpp build (no -march=native: the image runs on other CPUs than the builder's).
RUN python -m venv .venv \
    && CMAKE_ARGS="-DGGML_NATIVE=OFF" .venv/bin/pip install --no-cache-dir -e . \
    && touch .venv/.parley-installed \
    && make proto
ENV PARLEY_GRPC_HOST=0.0.0.0 PARLEY_HTTP_HOST=0.0.0.0 PARLEY_METRICS_HOST=0.0.0.0 \
    PARLEY_STORE_PATH=/var/lib/parley/parley.sqlite3 PARLEY_LOG_FORMAT=json
EXPOSE 8080 50051 9464
ENTRYPOINT ["/app/.venv/bin/parley"]
CMD ["run"]
