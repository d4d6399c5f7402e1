"""Alpaca-format fine-tuning data: checks, prompt format, tokens and masks, packing, order, the trainer on it."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchtune")
tokenizers = pytest.importorskip("tokenizers")

from autotune.errors import UserError  # noqa: E402
from autotune.gpu.backend import _finetune_inputs  # noqa: E402
from autotune.gpu.finetune_data import (  # noqa: E402
    CROSS_ENTROPY_IGNORE_IDX,
    AlpacaSample,
    finetune_batches,
    format_prompt,
    load_alpaca,
    load_tokenizer,
    model_tokenizer,
    pack,
    sample_order,
    tokenize_sample,
)
from autotune.gpu.trainer import TrainerConfig, read_iteration_log, run, training_batches  # noqa: E402
from autotune.policy import SharingPolicy  # noqa: E402
from tiny_model import TINY  # noqa: E402

IGNORE = CROSS_ENTROPY_IGNORE_IDX
SAMPLES = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "output": "Hi there!"},  # no input at all
    {"instruction": "Repeat the word.", "input": "echo", "output": "echo echo"},
    {"instruction": "Name a fruit.", "input": None, "output": "An apple."},
    {"instruction": "Count to three.", "input": "", "output": "One two three."},
]
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2


def _words() -> list[str]:
    texts = [format_prompt(AlpacaSample(s["instruction"], s.get("input") or "", s["output"])) + " " + s["output"]
             for s in SAMPLES]
    return sorted({w for text in texts for w in text.split()})


WORDS = _words()
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}  # < 128 words: fits TINY's vocab


def write_tokenizer(folder: Path, config: bool = True) -> Path:
    """A WordLevel tokenizer over the samples' words, split on whitespace; with
    ``config`` a tokenizer_config.json naming <s> and </s> as BOS and EOS."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    if config:
        (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    return folder


def ids(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(SAMPLES))
    return path


@pytest.fixture
def tok_dir(tmp_path: Path) -> Path:
    return write_tokenizer(tmp_path / "model")


# ---------------------------------------------------------------- file and format


def test_loads_entries_with_and_without_input(data: Path) -> None:
    samples = load_alpaca(data)
    assert len(samples) == 6
    assert samples[1] == AlpacaSample("Add the numbers.", "2 and 3", "5")
    assert samples[2].input == "" and samples[4].input == ""  # absent and null


def test_prompt_is_torchtunes_alpaca_template() -> None:
    from torchtune.data import AlpacaToMessages

    for entry in SAMPLES:
        sample = AlpacaSample(entry["instruction"], entry.get("input") or "", entry["output"])
        messages = AlpacaToMessages(train_on_input=False)(entry)["messages"]
        assert format_prompt(sample) == messages[0].text_content
        assert messages[0].masked and not messages[1].masked
    assert format_prompt(AlpacaSample("Do it.", "", "x")).endswith("### Instruction:\nDo it.\n\n### Response:\n")
    assert "### Input:\nctx\n\n### Response:\n" in format_prompt(AlpacaSample("Do it.", "ctx", "x"))


@pytest.mark.parametrize(("content", "problem"), [
    (None, "no such file"),
    ("[{", "not valid JSON"),
    ('{"instruction": "a", "output": "b"}', "expected a JSON list"),
    ("[]", "the list is empty"),
    ('[{"instruction": "a", "output": "b"}, "text"]', "entry 1 is a str"),
    ('[{"instruction": "a"}]', "entry 0 has no 'output'"),
    ('[{"output": "b"}]', "entry 0 has no 'instruction'"),
    ('[{"instruction": "a", "output": 3}]', "entry 0: 'output' must be a string, not int"),
])
def test_bad_files_are_one_line_user_errors(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as e:
        load_alpaca(path)
    message = str(e.value)
    assert problem in message and str(path) in message and "\n" not in message


# ---------------------------------------------------------------- tokens and labels


def test_tokens_are_bos_prompt_response_eos_and_labels_mask_the_prompt(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    sample = AlpacaSample("Add the numbers.", "2 and 3", "5")
    tokens, labels = tokenize_sample(sample, tok)
    prompt = ids(format_prompt(sample))
    assert tokens == [1] + prompt + [VOCAB["5"], 2]
    assert prompt[:2] == [VOCAB["Below"], VOCAB["is"]] and prompt[-2:] == [VOCAB["###"], VOCAB["Response:"]]
    # labels[t] = tokens[t + 1] where that token is of the response; the prompt's and the last are -100
    assert labels == [IGNORE] * len(prompt) + [VOCAB["5"], 2, IGNORE]
    assert len(labels) == len(tokens)


def test_without_specials_there_is_no_bos_or_eos(tmp_path: Path) -> None:
    tok = load_tokenizer(write_tokenizer(tmp_path / "plain", config=False) / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (None, None)
    tokens, labels = tokenize_sample(AlpacaSample("Say hi.", "", "Hi there!"), tok)
    prompt = ids(format_prompt(AlpacaSample("Say hi.", "", "x")))
    assert tokens == prompt + ids("Hi there!")
    assert labels == [IGNORE] * (len(prompt) - 1) + ids("Hi there!") + [IGNORE]


def test_specials_from_the_post_processor(tmp_path: Path) -> None:
    from tokenizers.processors import TemplateProcessing

    folder = write_tokenizer(tmp_path / "pp", config=False)
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # as Llama 3 adds BOS
    tok.save(str(folder / "tokenizer.json"))
    assert (load_tokenizer(folder).bos_id, load_tokenizer(folder).eos_id) == (1, None)


def test_bad_tokenizers_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load it"):
        load_tokenizer(tmp_path / "broken.json")


# ---------------------------------------------------------------- packing and order


def test_packing_cuts_exact_chunks_and_keeps_labels_within_samples() -> None:
    a = ([10, 11, 12, 13, 14], [IGNORE, IGNORE, 13, 14, IGNORE])
    b = ([20, 21, 22], [IGNORE, 22, IGNORE])
    chunks = list(pack([a, b, a], seq_len=4))
    assert chunks == [
        ([10, 11, 12, 13], [IGNORE, IGNORE, 13, 14]),  # 13's label 14 is in the next chunk: same sample
        ([14, 20, 21, 22], [IGNORE, IGNORE, 22, IGNORE]),  # no label from a's end into b's start
        ([10, 11, 12, 13], [IGNORE, IGNORE, 13, 14]),
    ]  # the last 1 token (14) waits for more data


def test_packing_skips_chunks_with_nothing_to_train() -> None:
    long_prompt = ([5] * 9 + [6], [IGNORE] * 8 + [6, IGNORE])
    chunks = list(pack([long_prompt, long_prompt], seq_len=4))
    assert all(any(x != IGNORE for x in labels) for _, labels in chunks)
    assert len(chunks) == 2  # of 5 chunks, those holding position 8 of each sample


def test_order_is_per_seed_and_the_ranks_shards_are_disjoint() -> None:
    n = 10
    first = list(islice(sample_order(n, seed=3), 2 * n))
    assert sorted(first[:n]) == list(range(n)) and sorted(first[n:]) == list(range(n))  # passes cycle
    assert first[:n] != first[n:]  # each pass reshuffled
    assert first == list(islice(sample_order(n, seed=3), 2 * n))
    assert first != list(islice(sample_order(n, seed=4), 2 * n))
    shards = [list(islice(sample_order(n, seed=3, rank=r, world_size=3), len(range(r, n, 3)))) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(n))  # disjoint, and together the whole pass
    assert shards[1] == first[1:n:3]
    with pytest.raises(UserError, match="fewer than the 4 trainer ranks"):
        next(sample_order(3, seed=0, world_size=4))


def test_batches_are_packed_samples_in_order(data: Path, tok_dir: Path) -> None:
    seq_len = 16
    batches = finetune_batches(data, tok_dir, seq_len=seq_len, seed=5, device="cpu", vocab_size=len(VOCAB))
    got = list(islice(batches, 60))  # several passes over the 6 samples
    assert all(t.shape == (1, seq_len) and l.shape == (1, seq_len) and t.dtype == torch.long for t, l in got)
    tok = load_tokenizer(tok_dir)
    samples = load_alpaca(data)
    stream = [tokenize_sample(samples[i], tok) for i in islice(sample_order(len(samples), seed=5), 200)]
    expected = list(islice(pack(stream, seq_len), 60))
    assert [(t[0].tolist(), l[0].tolist()) for t, l in got] == expected
    flat = [t for tokens, _ in stream for t in tokens]
    flat_labels = [x for _, labels in stream for x in labels]
    first = min(i for i, x in enumerate(flat_labels) if x != IGNORE) // seq_len  # the first chunk with a label
    assert first >= 1 and got[0][0][0].tolist() == flat[first * seq_len:(first + 1) * seq_len]  # all-prompt skipped
    again = finetune_batches(data, tok_dir, seq_len=seq_len, seed=5, device="cpu")
    assert all(torch.equal(t, t2) and torch.equal(l, l2) for (t, l), (t2, l2) in zip(got, islice(again, 60)))
    other = finetune_batches(data, tok_dir, seq_len=seq_len, seed=6, device="cpu")
    assert not torch.equal(torch.cat([t for t, _ in got[:6]]), torch.cat([t for t, _ in islice(other, 6)]))


def test_each_rank_packs_its_own_shard(data: Path, tok_dir: Path) -> None:
    tok, samples = load_tokenizer(tok_dir), load_alpaca(data)
    firsts = []
    for rank in range(2):
        batches = finetune_batches(data, tok_dir, seq_len=8, seed=1, device="cpu", rank=rank, world_size=2)
        order = sample_order(len(samples), seed=1, rank=rank, world_size=2)
        expected = pack((tokenize_sample(samples[i], tok) for i in order), 8)
        got = [(t[0].tolist(), l[0].tolist()) for t, l in islice(batches, 30)]  # > 2 passes of 3 samples
        assert got == list(islice(expected, 30))
        firsts.append(got[0])
    assert firsts[0] != firsts[1]


def test_a_tokenizer_beyond_the_models_vocab_is_a_user_error(data: Path, tok_dir: Path) -> None:
    batches = finetune_batches(data, tok_dir, seq_len=8, seed=0, device="cpu", vocab_size=10)
    with pytest.raises(UserError, match="not below the model's vocab size 10"):
        next(batches)


def test_nothing_to_train_on_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "empty-outputs.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "output": ""}]))
    folder = write_tokenizer(tmp_path / "plain", config=False)  # no EOS: an empty output trains nothing
    with pytest.raises(UserError, match="no sample has a response token"):
        next(finetune_batches(path, folder, seq_len=8, seed=0, device="cpu"))


# ---------------------------------------------------------------- backend and trainer


def test_the_backend_takes_the_models_tokenizer(data: Path, tok_dir: Path, tmp_path: Path) -> None:
    assert _finetune_inputs(None, None) == (None, None)
    assert _finetune_inputs(data, tok_dir) == (data.resolve(), (tok_dir / "tokenizer.json").resolve())
    assert model_tokenizer(tok_dir) == tok_dir / "tokenizer.json"
    message = "--finetune-data needs a tokenizer: pass --model PATH of a model folder with tokenizer.json"
    for model_path in (None, tmp_path / "no-tokenizer"):
        with pytest.raises(UserError) as e:
            _finetune_inputs(data, model_path)
        assert str(e.value) == message
    with pytest.raises(UserError, match="no such file"):
        _finetune_inputs(tmp_path / "missing.json", tok_dir)


FREE = SharingPolicy(mps=True, gpu_memory_utilization=0.45, trainer_seq_len_tokens=32)


def test_training_batches_choose_the_source(data: Path, tok_dir: Path) -> None:
    synthetic = TrainerConfig(model="tiny", policy=FREE.to_dict(), device="cpu")
    tokens, _ = next(training_batches(synthetic, 128, 32, "cpu"))
    real = TrainerConfig(model="tiny", policy=FREE.to_dict(), device="cpu", finetune_data=str(data),
                         tokenizer=str(tok_dir))
    real_tokens, _ = next(training_batches(real, 128, 32, "cpu"))
    assert torch.equal(real_tokens, next(finetune_batches(data, tok_dir, seq_len=32, seed=0, device="cpu"))[0])
    assert tokens.max() >= len(VOCAB)  # synthetic ids span the model's vocab, not the tokenizer's words
    with pytest.raises(UserError, match="needs a tokenizer"):
        training_batches(TrainerConfig(model="tiny", policy=FREE.to_dict(), finetune_data=str(data)), 128, 32, "cpu")


def test_the_trainer_runs_on_alpaca_data(data: Path, tok_dir: Path, tmp_path: Path) -> None:
    (tok_dir / "config.json").write_text(json.dumps(TINY.hf_config()))  # a model folder with its tokenizer
    log = tmp_path / "it.jsonl"
    config = TrainerConfig(model=str(tok_dir), policy=FREE.to_dict(), iteration_log=str(log), device="cpu",
                           warmup_steps=1, max_steps=2, finetune_data=str(data), tokenizer=str(tok_dir))
    config.write(tmp_path / "c.json")
    assert TrainerConfig.read(tmp_path / "c.json") == config
    counts = run(config, None, lambda: False)
    assert counts["steps"] == 3 and counts["logged_steps"] == 2
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [d["tokens"] for d in lines] == [32, 32]
    assert all(0 < d["loss"] < 10 for d in lines)  # finite: a mean over the response tokens only (ln 128 = 4.85)
    assert len(read_iteration_log(log)) == 2
