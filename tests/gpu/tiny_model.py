"""The tiny Llama-3.1-shaped model the CPU trainer tests build (float32, 2 layers)."""

from autotune.models import PRESETS, ModelConfig

TINY = ModelConfig(
    name="tiny", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, vocab_size=128, rope_theta=500000.0, rope_scaling=PRESETS["llama-3.1-8b"].rope_scaling,
)
