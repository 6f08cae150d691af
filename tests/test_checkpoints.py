"""Checkpoint formats: Sakana's published layout, bad checkpoints, and the converter.

python -m pytest tests/test_checkpoints.py
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from model_patches.config import DropeConfig, DropeConfigError
from model_patches.convert import convert
from model_patches.convert import main as convert_main
from model_patches.reference import load_reference

from helpers import assert_parity, prompt, reference_run, vllm_engine, vllm_run

L = 64


def sakana_checkpoint(tiny_checkpoint, tmp_path, family="llama"):
    """A checkpoint whose config.json is exactly Sakana's format: no drope_* keys."""
    src = tiny_checkpoint(family, DropeConfig(train_context=L, attention_type="qk_norm_nope"), seed=5)
    dst = tmp_path / f"sakana-{family}"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k in [k for k in cfg if k.startswith("drope_")]:
        del cfg[k]
    arch = cfg["architectures"][0]
    cfg.update(
        max_position_embeddings=L,  # Sakana keeps the parent's value = the length they trained at
        softmax_scale=0.15,
        auto_map={
            "AutoConfig": f"modeling_drope.{arch.replace('ForCausalLM', 'Config')}",
            "AutoModelForCausalLM": f"modeling_drope.{arch}",
        },  # the file is absent: loading must not need it
    )
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sakana_format_loads_without_remote_code(tiny_checkpoint, tmp_path, family):
    ckpt = sakana_checkpoint(tiny_checkpoint, tmp_path, family)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=False).eval()
    assert type(ref).__module__ == "model_patches.reference"
    assert ref.model.layers[0].self_attn.scaling == 0.15
    p = prompt(L - 16, seed=1)  # prompt + 12 new tokens fit in max_position_embeddings
    with vllm_engine(ckpt, trust_remote_code=False, max_model_len=L) as llm:
        (got,) = vllm_run(llm, [p])
    assert_parity(got, reference_run(ref, p), f"sakana {family}")


def test_sakana_checkpoint_served_past_its_length_with_overrides(tiny_checkpoint, tmp_path):
    """How the server serves s > 1: pin L_train, set c, raise the length vLLM will accept."""
    ckpt = sakana_checkpoint(tiny_checkpoint, tmp_path)
    over = {"drope_train_context": L, "drope_beta_coef": 0.3}
    ref = load_reference(ckpt, **over)
    p = prompt(3 * L, seed=2)
    with vllm_engine(ckpt, max_model_len=4 * L, hf_overrides={**over, "max_position_embeddings": 4 * L}) as llm:
        (got,) = vllm_run(llm, [p])
    assert_parity(got, reference_run(ref, p), "sakana past L_train")


def _break(ckpt_dir, tmp_path, name, edit_config=None, drop_weights=None):
    dst = tmp_path / name
    shutil.copytree(ckpt_dir, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(edit_config)
        (dst / "config.json").write_text(json.dumps(cfg))  # NaN is written as the JSON token NaN
    if drop_weights:
        w = load_file(dst / "model.safetensors")
        save_file(
            {k: v for k, v in w.items() if drop_weights not in k}, dst / "model.safetensors", metadata={"format": "pt"}
        )
    return dst


BAD = [
    ("unknown-attention", dict(edit_config={"attention_type": "alibi_nope"}), "unknown attention_type 'alibi_nope'"),
    ("missing-q-norm", dict(drop_weights=".q_norm."), "needs QK-norm weights"),
    ("zero-context", dict(edit_config={"drope_train_context": 0}), "must be a positive integer"),
    ("nan-beta", dict(edit_config={"drope_beta_coef": math.nan}), "must be a finite number"),
]


@pytest.mark.parametrize("name,how,match", BAD, ids=[b[0] for b in BAD])
def test_bad_checkpoint_fails_at_load_with_clear_message(tiny_checkpoint, tmp_path, name, how, match):
    good = tiny_checkpoint("llama", DropeConfig(train_context=L, attention_type="qk_norm_nope"))
    bad = _break(good, tmp_path, name, **how)
    with pytest.raises(DropeConfigError, match=match):
        AutoModelForCausalLM.from_pretrained(bad)
    with pytest.raises(Exception, match=match):
        with vllm_engine(bad, max_model_len=128):
            pass


def test_convert_plain_to_drope_then_parity(tiny_checkpoint, tmp_path):
    parent = tiny_checkpoint("qwen2", None, seed=3)
    dst = tmp_path / "converted"
    drope = convert(parent, dst, attention_type="qk_norm_nope", train_context=L, beta_coef=0.25)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_drope" and cfg["architectures"] == ["DroPEQwen2ForCausalLM"]
    assert DropeConfig.from_hf_config(cfg) == drope
    assert (dst / "tokenizer.json").exists() and (dst / "chat_template.jinja").exists()
    # Original tensors copied untouched; norms added at exactly 1.
    old, new = load_file(parent / "model.safetensors"), load_file(dst / "model-00001-of-00002.safetensors")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    norms = load_file(dst / "model-00002-of-00002.safetensors")
    assert len(norms) == 2 * 2 and all(torch.equal(v, torch.ones_like(v)) for v in norms.values())

    ref = AutoModelForCausalLM.from_pretrained(dst).eval()
    p = prompt(2 * L, seed=4)
    with vllm_engine(dst) as llm:
        (got,) = vllm_run(llm, [p])
    assert_parity(got, reference_run(ref, p), "converted qwen2")


def test_convert_refuses_to_overwrite_and_reports_errors(tiny_checkpoint, tmp_path, capsys):
    parent = tiny_checkpoint("llama", None)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    assert convert_main([str(parent), str(dst)]) == 2
    assert "not empty" in capsys.readouterr().err and (dst / "keep.txt").exists()
    assert convert_main([str(parent), str(dst), "--overwrite", "--train-context", "128"]) == 0
    assert not (dst / "keep.txt").exists()
    assert json.loads((dst / "config.json").read_text())["drope_train_context"] == 128
    # A DroPE checkpoint is not converted twice.
    assert convert_main([str(dst), str(tmp_path / "again")]) == 2
    assert "already a DroPE checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "family,variant,unused", [("llama", "q_norm_nope", "k_norm"), ("qwen2", "k_norm_nope", "q_norm")]
)
def test_single_norm_variants_ignore_the_other_norm_sakana_ships(tiny_checkpoint, tmp_path, family, variant, unused):
    """Sakana's q_norm_nope / k_norm_nope checkpoints carry both norms; the unused one must not matter."""
    src = tiny_checkpoint(family, DropeConfig(train_context=L, beta_coef=0.3, attention_type="qk_norm_nope"), seed=6)
    ckpt = tmp_path / variant
    shutil.copytree(src, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["attention_type"] = variant
    (ckpt / "config.json").write_text(json.dumps(cfg))
    w = load_file(ckpt / "model.safetensors")
    assert any(f".{unused}." in k for k in w)  # the unused norm really is in the file
    # Scale the unused norm far from 1: if anything applied it, parity would break.
    save_file(
        {k: v * 5 if f".{unused}." in k else v for k, v in w.items()},
        ckpt / "model.safetensors",
        metadata={"format": "pt"},
    )
    ref = load_reference(ckpt)
    p = prompt(3 * L, seed=4)
    with vllm_engine(ckpt) as llm:
        (got,) = vllm_run(llm, [p])
    assert_parity(got, reference_run(ref, p), f"{family} {variant} with an unused {unused}")


def test_qwen2_tied_embeddings_and_sliding_window_layers(tiny_checkpoint):
    """Qwen2 options the DroPE classes inherit from vLLM's Llama code: tied lm_head, sliding-window layers."""
    drope = DropeConfig(train_context=L, beta_coef=0.3, attention_type="qk_norm_nope")
    ckpt = tiny_checkpoint(
        "qwen2",
        drope,
        seed=12,
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=48,
        max_window_layers=1,
    )
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and "sliding_attention" in cfg["layer_types"], cfg.get("layer_types")
    ref = load_reference(ckpt)
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    p = prompt(3 * L, seed=13)  # 192 tokens: far past the 48-token window
    with vllm_engine(ckpt) as llm:
        (got,) = vllm_run(llm, [p])
    assert_parity(got, reference_run(ref, p), "qwen2 tied + sliding window")
