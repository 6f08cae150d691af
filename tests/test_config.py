"""DropeConfig: parsing Sakana's and our config.json fields, defaults, validation.

python -m pytest tests/test_config.py
"""

import json
import math

import pytest

from model_patches.config import DropeConfig, DropeConfigError, is_drope_config

# Sakana's published format (SakanaAI/SmolLM-360M-DroPE style), trimmed to what matters.
SAKANA = {
    "architectures": ["DroPELlamaForCausalLM"],
    "model_type": "llama_drope",
    "attention_type": "qk_norm_nope",
    "auto_map": {
        "AutoConfig": "modeling_drope.DroPELlamaConfig",
        "AutoModelForCausalLM": "modeling_drope.DroPELlamaForCausalLM",
    },
    "max_position_embeddings": 2048,
    "softmax_scale": 0.125,
}


def test_sakana_format_unchanged():
    d = DropeConfig.from_hf_config(SAKANA)
    assert d == DropeConfig(
        train_context=2048, beta_coef=0.0, beta_mode="log", attention_type="qk_norm_nope", softmax_scale=0.125
    )
    assert d.q_norm and d.k_norm and not d.scales_queries
    assert is_drope_config(SAKANA) and not is_drope_config(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    )


def test_our_fields_win_and_overrides_win_over_file():
    cfg = dict(SAKANA, drope_train_context=4096, drope_beta_coef=0.103, drope_beta_mode="floor")
    d = DropeConfig.from_hf_config(cfg)
    assert (d.train_context, d.beta_coef, d.beta_mode) == (4096, 0.103, "floor")
    d = DropeConfig.from_hf_config(cfg, train_context=1024, beta_coef=None, beta_mode="log")
    assert (d.train_context, d.beta_coef, d.beta_mode) == (1024, 0.103, "log")


def test_works_on_config_objects_too():
    class Obj:
        max_position_embeddings = 512
        attention_type = "k_norm_nope"

    d = DropeConfig.from_hf_config(Obj())
    assert d.train_context == 512 and d.k_norm and not d.q_norm


def test_roundtrip_through_hf_fields():
    d = DropeConfig(
        train_context=300, beta_coef=0.2, beta_mode="floor", attention_type="q_norm_nope", softmax_scale=0.1
    )
    assert DropeConfig.from_hf_config(d.to_hf_fields()) == d
    assert json.loads(json.dumps(d.to_hf_fields())) == d.to_hf_fields()


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(attention_type="rope"), "unknown attention_type 'rope'"),
        (dict(drope_train_context=0), "positive integer"),
        (dict(drope_train_context=-5), "positive integer"),
        (dict(drope_train_context=2048.5), "positive integer"),
        (dict(drope_beta_coef=math.nan), "finite number"),
        (dict(drope_beta_coef=math.inf), "finite number"),
        (dict(drope_beta_coef="0.1"), "finite number"),
        (dict(drope_beta_mode="exp"), "drope_beta_mode"),
        (dict(softmax_scale=-1.0), "softmax_scale"),
    ],
)
def test_bad_values_raise_one_clear_error(bad, match):
    with pytest.raises(DropeConfigError, match=match):
        DropeConfig.from_hf_config(dict(SAKANA, **bad))


def test_missing_training_context_is_explained():
    with pytest.raises(DropeConfigError, match="training context"):
        DropeConfig.from_hf_config({"model_type": "llama_drope"})
    assert DropeConfig.from_hf_config({"model_type": "llama_drope"}, train_context=64).train_context == 64
