"""Model presets: the Hugging Face config fields that set a model's shapes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autotune.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    @property
    def q_size(self) -> int:  # features of the q projection
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:  # features of each of the k and v projections
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Weights of the base model (no LoRA), counted from the shapes."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * h * i
        layer = attn + mlp + 2 * h  # two RMSNorm weights
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + embed + head + h

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token takes over all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def lora_params(self, rank: int) -> int:
        """LoRA weights for rank ``rank`` on q, k and v of every layer."""
        h = self.hidden_size
        per_layer = rank * (h + self.q_size) + 2 * rank * (h + self.kv_size)
        return self.num_layers * per_layer

    def hf_config(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` for this preset (LlamaForCausalLM or Qwen2)."""
        qwen = self.name.startswith("qwen")
        cfg: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen else "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        if not qwen:
            cfg["attention_bias"] = self.qkv_bias
            cfg["mlp_bias"] = False
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _llama3_rope(factor: float) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


PRESETS: dict[str, ModelConfig] = {
    "llama-3.1-8b": ModelConfig(
        name="llama-3.1-8b", hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=131072, rope_scaling=_llama3_rope(8.0),
    ),
    "llama-3.2-1b": ModelConfig(
        name="llama-3.2-1b", hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=131072, tie_word_embeddings=True, rope_scaling=_llama3_rope(32.0),
    ),
    "llama-2-7b": ModelConfig(
        name="llama-2-7b", hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, vocab_size=32000, rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    "llama-2-13b": ModelConfig(
        name="llama-2-13b", hidden_size=5120, intermediate_size=13824, num_layers=40,
        num_heads=40, num_kv_heads=40, head_dim=128, vocab_size=32000, rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    "qwen2.5-7b": ModelConfig(
        name="qwen2.5-7b", hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, vocab_size=152064, rope_theta=1000000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-6, qkv_bias=True,
    ),
}


def from_hf_config(path: Path) -> ModelConfig:
    """Shapes of a local model folder (its Hugging Face ``config.json``)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelConfig(
            name=str(path),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            rope_scaling=cfg.get("rope_scaling"),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read model shapes from {path}/config.json: {e}") from None


def from_name(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(
            f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None


def resolve_model(name_or_path: str) -> ModelConfig:
    """A local folder with a Hugging Face ``config.json``, or a preset's name."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return from_hf_config(path)
    return from_name(name_or_path)
