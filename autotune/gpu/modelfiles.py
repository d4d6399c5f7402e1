"""Files the vLLM server loads: a preset's model folder and LoRA adapters.

A preset's folder holds its Hugging Face ``config.json`` (vLLM builds the
model from it and, with ``--load-format dummy``, fills random weights), a
``generation_config.json`` and, optionally, a WordLevel tokenizer with one
token per id (``t0``, ``t1``, ...), which lets the server run with a tokenizer
and ``vllm bench serve`` run against it. Adapters are in PEFT format with
random weights of the right shapes, written as bf16 safetensors by the
safetensors library.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from autotune.models import ModelConfig

LORA_TARGETS = ("q_proj", "k_proj", "v_proj")
_MAX_MODEL_LEN = 2048  # tokens; the tokenizer's model_max_length


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_model_folder(model: ModelConfig, folder: Path, *, tokenizer: bool = True) -> Path:
    """Write ``config.json`` and ``generation_config.json`` (and a tokenizer)
    of a preset into ``folder``, for ``--model folder --load-format dummy``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = model.hf_config()
    _write_json(folder / "config.json", hf)
    _write_json(folder / "generation_config.json", {
        "_from_model_config": True,
        "bos_token_id": hf["bos_token_id"],
        "eos_token_id": hf["eos_token_id"],
    })
    if tokenizer:
        assert (hf["bos_token_id"], hf["eos_token_id"]) == (1, 2), "the tokenizer's specials are ids 1 and 2"
        write_tokenizer(folder, model.vocab_size)
    return folder


_SPECIAL_TEXTS = {0: "<unk>", 1: "<s>", 2: "</s>"}  # unk, and the presets' bos and eos ids


def token_text(token_id: int) -> str:
    """The WordLevel tokenizer's text for one id: ``t123``, the first three
    special (distinct texts, since special tokens are matched inside words)."""
    return _SPECIAL_TEXTS.get(token_id, f"t{token_id}")


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A fast (``tokenizers``) WordLevel tokenizer, one token per id, split on
    whitespace, as ``PreTrainedTokenizerFast.save_pretrained`` lays it out:
    "t5 t9" encodes to [5, 9] and back; no BOS is added."""
    folder = Path(folder)
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "vocab": {token_text(i): i for i in range(vocab_size)},
            "unk_token": token_text(0),
        },
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    specials = {"bos_token": token_text(1), "eos_token": token_text(2), "unk_token": token_text(0)}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": _MAX_MODEL_LEN,
        "clean_up_tokenization_spaces": False,
        **specials,
    })


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write float tensors as bf16 safetensors (rounded to nearest even), with
    the safetensors library's own writer."""
    import torch  # the GPU extra's; numpy has no bfloat16
    from safetensors.torch import save_file

    save_file({name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16)
               for name, a in tensors.items()}, str(path), metadata={"format": "pt"})


def adapter_name(index: int) -> str:
    """The name a served adapter has in requests' ``model`` field."""
    return f"adapter-{index}"


def lora_shapes(model: ModelConfig, rank: int) -> dict[str, tuple[int, int]]:
    """PEFT key -> shape: lora_A [rank, in features], lora_B [out features, rank]."""
    out_features = {"q_proj": model.q_size, "k_proj": model.kv_size, "v_proj": model.kv_size}
    shapes = {}
    for layer in range(model.num_layers):
        for target in LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, model.hidden_size)
            shapes[f"{prefix}.lora_B.weight"] = (out_features[target], rank)
    return shapes


def write_lora_adapter(model: ModelConfig, folder: Path, *, rank: int, seed: int,
                       alpha: int | None = None, base_model: str = "") -> Path:
    """One PEFT LoRA adapter on q/k/v of every layer, random weights
    (std 0.01; their values do not change the serving cost)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or model.name,
        "r": rank,
        "lora_alpha": 2 * rank if alpha is None else alpha,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    })
    rng = np.random.default_rng(seed)
    tensors = {key: (rng.standard_normal(shape, dtype=np.float32) * 0.01)
               for key, shape in lora_shapes(model, rank).items()}
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    return folder


def write_lora_adapters(model: ModelConfig, root: Path, *, count: int, rank: int, seed: int,
                        base_model: str = "") -> tuple[tuple[str, Path], ...]:
    """``count`` adapters under ``root/adapter-i`` (adapter i seeded ``seed + i``);
    returns (name, folder) pairs for ``--lora-modules``."""
    return tuple(
        (adapter_name(i), write_lora_adapter(model, Path(root) / adapter_name(i), rank=rank,
                                             seed=seed + i, base_model=base_model))
        for i in range(count)
    )
