"""The LoRA trainer's model: torchtune's LoRA builders for a preset's or a
Hugging Face folder's shapes (LoRA on q, k and v only, base frozen), and the
folder's ``*.safetensors`` loaded as the base weights.

The trainer builds it whole (``autotune.gpu.trainer``) or FSDP2-sharded over
its ranks (``autotune.gpu.distributed``). torchtune, torch and safetensors are
imported where used: this module stays cheap to import without them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from autotune.errors import UserError
from autotune.models import ModelConfig, from_hf_config, from_name

LORA_ATTN_MODULES = ["q_proj", "k_proj", "v_proj"]


def model_config(model: str) -> ModelConfig:
    """A preset's shapes, or those of a local folder's ``config.json``."""
    return from_hf_config(Path(model)) if Path(model).is_dir() else from_name(model)


def lora_builder(cfg: ModelConfig) -> tuple[Callable[..., Any], dict[str, Any]]:
    """torchtune's LoRA component builder for these shapes, and its model-specific kwargs."""
    from torchtune.models.llama2._component_builders import lora_llama2
    from torchtune.models.llama3._component_builders import lora_llama3
    from torchtune.models.llama3_1._component_builders import lora_llama3_1
    from torchtune.models.llama3_2._component_builders import lora_llama3_2
    from torchtune.models.qwen2._component_builders import lora_qwen2

    if cfg.qkv_bias:  # Qwen2 / Qwen2.5: q/k/v bias
        return lora_qwen2, {"rope_base": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings}
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in expected.items():  # torchtune's Llama3ScaledRoPE fixes these
            if float(scaling.get(key, value)) != value:
                raise UserError(f"{cfg.name}: rope_scaling {key}={scaling[key]} is not supported (torchtune fixes {value})")
        kwargs = {"rope_base": cfg.rope_theta, "scale_factor": scaling["factor"]}
        if cfg.tie_word_embeddings:
            return lora_llama3_2, {**kwargs, "tie_word_embeddings": True}
        return lora_llama3_1, kwargs
    if scaling:
        raise UserError(f"{cfg.name}: rope_scaling {scaling} is not supported")
    if cfg.tie_word_embeddings:
        raise UserError(f"{cfg.name}: tied embeddings without llama3 rope scaling are not supported")
    if cfg.rope_theta == 10000.0:
        return lora_llama2, {}  # Llama 2's rotary base
    return lora_llama3, {"rope_base": cfg.rope_theta}


def build_model(
    cfg: ModelConfig, *, seq_len: int, lora_rank: int, lora_alpha: float, device: str, dtype: Any, seed: int = 0
) -> Any:
    """torchtune ``TransformerDecoder`` with LoRA on q/k/v, random init from
    ``seed``, only the LoRA weights trainable."""
    import torch
    from torchtune.modules.peft import get_adapter_params, set_trainable_params
    from torchtune.training import set_default_dtype

    if cfg.hidden_size // cfg.num_heads != cfg.head_dim:
        raise UserError(f"{cfg.name}: head_dim {cfg.head_dim} != hidden/heads; torchtune's builders need that")
    builder, kwargs = lora_builder(cfg)
    cuda = torch.device(device).type == "cuda"
    # The builders draw their init from torch's default generator: seed it
    # inside fork_rng, so that the global state is left as it was.
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []), set_default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        model = builder(
            lora_attn_modules=LORA_ATTN_MODULES,
            apply_lora_to_mlp=False,
            apply_lora_to_output=False,
            vocab_size=cfg.vocab_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            embed_dim=cfg.hidden_size,
            intermediate_dim=cfg.intermediate_size,
            max_seq_len=seq_len,  # RoPE cache length; one sample is seq_len tokens
            norm_eps=cfg.rms_norm_eps,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            **kwargs,
        )
    set_trainable_params(model, get_adapter_params(model))
    return model


def hf_state_dict(cfg: ModelConfig, folder: Path) -> dict[str, Any]:
    """A Hugging Face folder's ``*.safetensors`` as torchtune keys (its own conversion), on the CPU."""
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

    dims = {"num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "dim": cfg.hidden_size, "head_dim": cfg.head_dim}
    state: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        hf = load_file(str(shard), device="cpu")
        if cfg.qkv_bias:
            state.update(qwen2_hf_to_tune(hf, tie_word_embeddings=cfg.tie_word_embeddings, **dims))
        else:
            state.update(hf_to_tune(hf, **dims))
    if cfg.tie_word_embeddings:
        state.pop("output.weight", None)  # the output shares tok_embeddings.weight
    return state


def load_hf_weights(model: Any, cfg: ModelConfig, folder: Path) -> int:
    """Load a Hugging Face folder's ``*.safetensors`` into the base weights.
    Returns the number of tensors loaded."""
    state = hf_state_dict(cfg, folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    not_lora = [k for k in missing if "lora_" not in k]
    if not_lora or unexpected:
        raise UserError(f"{folder}: weights do not match the model (missing {not_lora[:3]}, unexpected {unexpected[:3]})")
    return len(state)
