"""The trainer's model: torchtune's LoRA builders per preset, Hugging Face weights loaded into the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchtune")

from autotune.gpu.lora_model import build_model, load_hf_weights, lora_builder, model_config  # noqa: E402
from autotune.models import PRESETS  # noqa: E402

from tiny_model import TINY  # noqa: E402


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_with_lora_on_qkv_only(preset: str) -> None:
    cfg = PRESETS[preset]
    model = build_model(cfg, seq_len=512, lora_rank=8, lora_alpha=16.0, device="meta", dtype=torch.bfloat16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable == cfg.lora_params(8)
    assert total - trainable == cfg.num_params  # the base model's shapes are the preset's
    names = {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "k_proj", "v_proj"}
    q = model.layers[0].attn.q_proj
    assert (q.rank, q.alpha) == (8, 16.0)


def test_builders_follow_the_presets_rope() -> None:
    fn, kwargs = lora_builder(PRESETS["llama-3.1-8b"])
    assert fn.__name__ == "lora_llama3_1" and kwargs == {"rope_base": 500000.0, "scale_factor": 8.0}
    fn, kwargs = lora_builder(PRESETS["llama-3.2-1b"])
    assert fn.__name__ == "lora_llama3_2" and kwargs["scale_factor"] == 32.0 and kwargs["tie_word_embeddings"]
    assert lora_builder(PRESETS["llama-2-7b"])[0].__name__ == "lora_llama2"
    fn, kwargs = lora_builder(PRESETS["qwen2.5-7b"])
    assert fn.__name__ == "lora_qwen2" and kwargs["rope_base"] == 1e6


def test_hf_weights_load_into_the_base(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf

    source = build_model(TINY, seq_len=16, lora_rank=8, lora_alpha=16.0, device="cpu", dtype=torch.float32, seed=1)
    base = {k: v for k, v in source.state_dict().items() if "lora_" not in k}
    hf = tune_to_hf(base, num_heads=4, num_kv_heads=2, dim=64, head_dim=16)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY.hf_config()))

    target = build_model(model_config(str(tmp_path)), seq_len=16, lora_rank=8, lora_alpha=16.0, device="cpu",
                         dtype=torch.float32, seed=2)
    assert load_hf_weights(target, TINY, tmp_path) == len(base)
    for name, value in target.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(value, base[name], msg=name)
