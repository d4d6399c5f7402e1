"""Model presets: shapes, parameter counts, KV-cache size, HF config round trip."""

from __future__ import annotations

import json

import pytest

from autotune.errors import UserError
from autotune.models import PRESETS, from_hf_config, from_name


@pytest.mark.parametrize("name, params, rel", [
    ("llama-3.1-8b", 8.03e9, 1e-3),
    ("llama-3.2-1b", 1.24e9, 5e-3),  # tied embeddings: one vocab x hidden matrix; "1.24B" is rounded
    ("llama-2-7b", 6.74e9, 1e-3),
    ("llama-2-13b", 13.02e9, 1e-3),
    ("qwen2.5-7b", 7.62e9, 1e-3),  # q/k/v bias
])
def test_parameter_counts_match_the_published_sizes(name, params, rel):
    assert from_name(name).num_params == pytest.approx(params, rel=rel)


def test_llama_3_1_8b_exact_parameter_count():
    assert from_name("llama-3.1-8b").num_params == 8_030_261_248
    assert from_name("llama-3.2-1b").num_params == 1_235_814_400


def test_kv_bytes_per_token():
    # 2 (k and v) x 32 layers x 8 kv heads x 128 head dim x 2 bytes (bf16)
    assert from_name("llama-3.1-8b").kv_bytes_per_token() == 131072
    assert from_name("llama-3.1-8b").kv_bytes_per_token(dtype_bytes=1) == 65536
    assert from_name("llama-2-7b").kv_bytes_per_token() == 2 * 32 * 32 * 128 * 2


def test_lora_params_rank_8_on_qkv():
    # per layer: q 8 x (4096 + 4096), k and v 8 x (4096 + 1024) each
    per_layer = 8 * 8192 + 2 * 8 * 5120
    assert from_name("llama-3.1-8b").lora_params(8) == 32 * per_layer


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UserError) as info:
        from_name("llama-9")
    msg = str(info.value)
    assert "unknown model preset 'llama-9'" in msg
    for name in PRESETS:
        assert name in msg


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_round_trip(tmp_path, name):
    preset = PRESETS[name]
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(preset.hf_config()))
    back = from_hf_config(folder)
    assert back.name == str(folder)
    fields = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "vocab_size", "rope_theta", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
              "qkv_bias", "rope_scaling")
    for f in fields:
        assert getattr(back, f) == getattr(preset, f), f
    assert back.num_params == preset.num_params


def test_hf_config_architectures():
    assert from_name("qwen2.5-7b").hf_config()["architectures"] == ["Qwen2ForCausalLM"]
    cfg = from_name("llama-3.1-8b").hf_config()
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0


def test_hf_config_without_head_dim_derives_it(tmp_path):
    cfg = from_name("llama-2-7b").hf_config()
    del cfg["head_dim"], cfg["num_key_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = from_hf_config(tmp_path)
    assert m.head_dim == 4096 // 32 and m.num_kv_heads == 32


def test_hf_config_missing_or_malformed(tmp_path):
    with pytest.raises(UserError, match="cannot read model shapes"):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read model shapes"):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UserError, match="num_attention_heads"):
        from_hf_config(tmp_path)
