import json

import numpy as np
import pytest

from autotune.gpu.modelfiles import adapter_name, token_text, write_lora_adapters, write_model_folder, write_safetensors
from autotune.models import ModelConfig, from_name

TINY = ModelConfig(name="tiny", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, vocab_size=300, rope_theta=10000.0)


def test_model_folder_holds_the_preset_config(tmp_path):
    model = from_name("llama-3.1-8b")
    folder = write_model_folder(model, tmp_path / "m", tokenizer=False)
    assert json.loads((folder / "config.json").read_text()) == model.hf_config()
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    assert not (folder / "tokenizer.json").exists()


def test_tokenizer_has_one_token_per_id(tmp_path):
    folder = write_model_folder(TINY, tmp_path / "m")
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 300 and vocab[token_text(299)] == 299
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.encode("t5 t9 t299").ids == [5, 9, 299]


def test_tokenizer_loads_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = write_model_folder(TINY, tmp_path / "m")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert len(tok) == 300
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok("t7 t8 t250", add_special_tokens=True)["input_ids"] == [7, 8, 250]
    assert tok.decode([7, 8, 250]) == "t7 t8 t250"
    assert tok("<s> t3 </s>")["input_ids"] == [1, 3, 2]


def test_bf16_rounds_to_nearest_even(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    x = np.array([1.0, -2.0, 1 + 2**-8, 1 + 3 * 2**-8, 3.14159], dtype=np.float32)
    write_safetensors(tmp_path / "x.safetensors", {"x": x})
    back = safetensors_torch.load_file(str(tmp_path / "x.safetensors"))["x"]
    assert back.view(torch.int16).tolist()[:4] == [0x3F80, -0x4000, 0x3F80, 0x3F82]  # 0xC000 as int16
    assert abs(back.float()[4].item() - 3.14159) < 2**-7 * 3.14159


def test_safetensors_layout(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((3,), -0.5, dtype=np.float32)
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": a, "b": b})
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0
    assert len(raw) == 8 + header_len + 18  # two bf16 tensors, 12 + 6 bytes
    # read back by the safetensors library itself, not by our own reader
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = safetensors_torch.load_file(str(path))
    assert sorted(tensors) == ["a", "b"]
    assert tensors["a"].dtype == torch.bfloat16 and list(tensors["a"].shape) == [2, 3]
    assert tensors["a"].float().tolist() == a.tolist()
    assert tensors["b"].float().tolist() == [-0.5] * 3


def test_lora_adapters_in_peft_format(tmp_path):
    adapters = write_lora_adapters(TINY, tmp_path / "lora", count=3, rank=4, seed=7)
    assert [name for name, _ in adapters] == ["adapter-0", "adapter-1", "adapter-2"] == [adapter_name(i) for i in range(3)]
    name, folder = adapters[1]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 8)
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    path = folder / "adapter_model.safetensors"
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(path), framework="numpy") as f:
        tensors = {k: {"shape": f.get_slice(k).get_shape(), "dtype": f.get_slice(k).get_dtype()} for k in f.keys()}
    assert len(tensors) == 2 * 3 * 2  # layers x (q, k, v) x (A, B)
    assert {t["dtype"] for t in tensors.values()} == {"BF16"}
    p = "base_model.model.model.layers.1.self_attn"
    assert tensors[f"{p}.q_proj.lora_A.weight"]["shape"] == [4, 32]  # [rank, hidden]
    assert tensors[f"{p}.q_proj.lora_B.weight"]["shape"] == [32, 4]  # [heads x head_dim, rank]
    assert tensors[f"{p}.k_proj.lora_B.weight"]["shape"] == [16, 4]  # [kv heads x head_dim, rank]
    assert tensors[f"{p}.v_proj.lora_A.weight"]["shape"] == [4, 32]
    n_values = sum(int(np.prod(t["shape"])) for t in tensors.values())
    assert n_values == TINY.lora_params(4)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header_len + 2 * n_values  # bf16 data
    # Different adapters get different random weights.
    assert (adapters[0][1] / "adapter_model.safetensors").read_bytes() != path.read_bytes()
