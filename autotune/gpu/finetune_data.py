"""Real fine-tuning data for the trainer: an Alpaca-format JSON and a tokenizer.

The file (``--finetune-data``, as Alpaca-cleaned ships it) is a JSON list of
``{"instruction", "input", "output"}``; ``input`` may be empty or absent. Each
sample is formatted with the Alpaca prompt template, word for word the one of
torchtune's ``alpaca_dataset`` (``torchtune.data.AlpacaToMessages``), and
tokenized with the model folder's ``tokenizer.json`` (the ``tokenizers``
package) as torchtune does with ``train_on_input=False``:

    tokens = [BOS] + encode(prompt) + encode(output) + [EOS]
    labels[t] = tokens[t + 1] if token t + 1 is of the output (or the EOS), else -100

BOS and EOS are the tokenizer's own (``tokenizer_config.json`` or
``special_tokens_map.json`` beside it, else what its post-processor adds), left
out when it has none. The labels are already shifted (the trainer's loss,
``tasklets.lm_loss``, compares logits at t with labels at t) and the prompt's
are ``CROSS_ENTROPY_IGNORE_IDX`` (-100), the ignore index of torchtune and of
``torch.nn.functional.cross_entropy``'s default, which ``lm_loss`` uses.

Packing, as the artifact's trainers do to 512 tokens: samples are concatenated
and cut into chunks of exactly ``seq_len`` tokens; a sample may run on into the
next chunk (its next-token labels go with it), and the last position of each
sample has label -100, so no label crosses from one sample into the next.
Attention is not masked per sample (plain causal attention over the chunk), and
a chunk whose labels are all -100 (a prompt longer than a chunk) is skipped, as
its mean loss would be 0/0. Every chunk is ``seq_len`` tokens of real text, so
the compute per step is that of the synthetic batches.

Order: a permutation of the samples drawn from ``seed`` each pass over the
file (the same on every rank), rank r of N taking every N-th of it, so the
ranks' samples are disjoint within a pass; the passes repeat endlessly.
Samples are tokenized as they are reached, so start-up costs only the JSON.

Why not torchtune's ``alpaca_dataset(..., packed=True)`` and ``PackedDataset``
(torchtune 0.6.1): ``alpaca_dataset`` takes a torchtune ``ModelTokenizer``
(``tokenize_messages``), and the only tokenizer.json reader torchtune ships,
``HuggingFaceBaseTokenizer``, is not one, so a model folder's tokenizer.json
(or a preset's generated one) cannot drive it; it reads the file through
Hugging Face ``datasets`` (not a dependency of the GPU extra); and
``PackedDataset`` tokenizes and packs the whole file when it is built (all of
Alpaca-cleaned before the first step, inside the trial's measured time) and
pads its last pack. The template and the labels above are torchtune's, so the
tokens are the ones its recipe would train on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autotune.errors import UserError

CROSS_ENTROPY_IGNORE_IDX = -100  # torchtune.data.CROSS_ENTROPY_IGNORE_IDX; F.cross_entropy's default
TOKENIZER_FILE = "tokenizer.json"

# torchtune.data.AlpacaToMessages' templates (from the original Alpaca code)
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class AlpacaSample:
    instruction: str
    input: str  # "" when the entry has none
    output: str


def format_prompt(sample: AlpacaSample) -> str:
    """The Alpaca prompt: with the input section only when the input is not empty."""
    if sample.input:
        return PROMPT_INPUT.format(instruction=sample.instruction, input=sample.input)
    return PROMPT_NO_INPUT.format(instruction=sample.instruction)


def load_alpaca(path: str | Path) -> list[AlpacaSample]:
    """Read and check an Alpaca-format JSON file; a one-line UserError names what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"fine-tuning data {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"fine-tuning data {path}: cannot read it ({e})") from None
    except ValueError as e:
        raise UserError(f"fine-tuning data {path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise UserError(f"fine-tuning data {path}: expected a JSON list of Alpaca samples, got {type(data).__name__}")
    if not data:
        raise UserError(f"fine-tuning data {path}: the list is empty")
    return [_sample(entry, i, path) for i, entry in enumerate(data)]


def _sample(entry: Any, index: int, path: str | Path) -> AlpacaSample:
    where = f"fine-tuning data {path}: entry {index}"
    if not isinstance(entry, dict):
        raise UserError(f"{where} is a {type(entry).__name__}, not an object")
    for key in ("instruction", "output"):
        if key not in entry:
            raise UserError(f"{where} has no '{key}'")
    values = {"instruction": entry["instruction"], "input": entry.get("input") or "", "output": entry["output"]}
    for key, value in values.items():
        if not isinstance(value, str):
            raise UserError(f"{where}: '{key}' must be a string, not {type(value).__name__}")
    return AlpacaSample(**values)


# ---------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` and its BOS / EOS ids (None: it has none)."""

    tokenizer: Any  # tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without the special tokens a post-processor would add."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def tokenizer_file(path: str | Path) -> Path:
    """``path`` itself, or the ``tokenizer.json`` inside a folder."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer of ``path`` (a ``tokenizer.json`` or its folder) with its BOS and EOS."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    if not file.is_file():
        raise UserError(f"tokenizer {file}: no such file")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exceptions
        raise UserError(f"tokenizer {file}: cannot load it ({str(e).splitlines()[0] if str(e) else e!r})") from None
    named = _special_names(file.parent)
    added = _post_processor_specials(tok)
    bos = _token_id(tok, named.get("bos_token"))
    eos = _token_id(tok, named.get("eos_token"))
    return TextTokenizer(tok, bos if bos is not None else added[0], eos if eos is not None else added[1])


def _special_names(folder: Path) -> dict[str, str]:
    """bos_token / eos_token texts from ``tokenizer_config.json``, else ``special_tokens_map.json``."""
    names: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later one wins
        try:
            config = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in ("bos_token", "eos_token"):
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, dict):  # {"content": "<s>", ...}
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    return names


def _token_id(tok: Any, text: str | None) -> int | None:
    return tok.token_to_id(text) if text is not None else None


def _post_processor_specials(tok: Any) -> tuple[int | None, int | None]:
    """(BOS, EOS) as the tokenizer's post-processor adds them around a text, if it does."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    if not plain or len(full) <= len(plain):
        return None, None
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if start is None:
        return None, None
    before, after = full[:start], full[start + len(plain):]
    return (before[0] if before else None), (after[-1] if after else None)


def tokenize_sample(sample: AlpacaSample, tokenizer: TextTokenizer) -> tuple[list[int], list[int]]:
    """(tokens, labels) of one sample, both [T]: labels are the next tokens,
    -100 where the next token is of the prompt (or there is none)."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    prompt = bos + tokenizer.encode(format_prompt(sample))
    response = tokenizer.encode(sample.output) + eos
    tokens = prompt + response
    trained = [False] * len(prompt) + [True] * len(response)  # train_on_input=False
    labels = [tokens[t + 1] if trained[t + 1] else CROSS_ENTROPY_IGNORE_IDX for t in range(len(tokens) - 1)]
    return tokens, labels + [CROSS_ENTROPY_IGNORE_IDX]


# ---------------------------------------------------------------- order and packing


def sample_order(num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> Iterator[int]:
    """Endless sample indices: each pass a fresh permutation from ``seed``
    (the same on every rank), of which rank r takes positions r, r + N, ..."""
    if num_samples < world_size:
        raise UserError(f"fine-tuning data has {num_samples} samples, fewer than the {world_size} trainer ranks")
    rng = np.random.default_rng(seed)
    while True:
        yield from (int(i) for i in rng.permutation(num_samples)[rank::world_size])


def pack(samples: Iterable[tuple[list[int], list[int]]], seq_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """Concatenate (tokens, labels) samples and cut them into chunks of exactly
    ``seq_len``; chunks with no label to train on are skipped. A last chunk
    short of ``seq_len`` (finite input) is dropped."""
    tokens: list[int] = []
    labels: list[int] = []
    for sample_tokens, sample_labels in samples:
        tokens += sample_tokens
        labels += sample_labels
        while len(tokens) >= seq_len:
            chunk_tokens, chunk_labels = tokens[:seq_len], labels[:seq_len]
            del tokens[:seq_len], labels[:seq_len]
            if any(label != CROSS_ENTROPY_IGNORE_IDX for label in chunk_labels):
                yield chunk_tokens, chunk_labels


def _tokenized(samples: list[AlpacaSample], tokenizer: TextTokenizer, order: Iterator[int], shard_size: int,
               source: str) -> Iterator[tuple[list[int], list[int]]]:
    """Samples in ``order``, tokenized; a UserError if a whole pass has nothing to train on."""
    while True:
        trained = False
        for _ in range(shard_size):
            tokens, labels = tokenize_sample(samples[next(order)], tokenizer)
            trained = trained or any(label != CROSS_ENTROPY_IGNORE_IDX for label in labels)
            yield tokens, labels
        if not trained:
            raise UserError(f"fine-tuning data {source}: no sample has a response token to train on")


def finetune_batches(data: str | Path, tokenizer: str | Path, *, seq_len: int, seed: int, device: str,
                     vocab_size: int | None = None, rank: int = 0, world_size: int = 1) -> Iterator[tuple[Any, Any]]:
    """Endless (tokens, labels), each [1, seq_len] int64 on ``device``: the
    same shapes as ``trainer.synthetic_batches``. The file and the tokenizer
    are read and checked now (UserError), the samples tokenized as reached;
    a token id >= ``vocab_size`` (a tokenizer not of this model) is a UserError."""
    samples = load_alpaca(data)
    tok = load_tokenizer(tokenizer)
    order = sample_order(len(samples), seed, rank, world_size)
    shard_size = len(range(rank, len(samples), world_size))  # samples per pass on this rank
    chunks = pack(_tokenized(samples, tok, order, shard_size, str(data)), seq_len)
    return _as_tensors(chunks, device, vocab_size, str(tokenizer_file(tokenizer)))


def _as_tensors(chunks: Iterator[tuple[list[int], list[int]]], device: str, vocab_size: int | None,
                source: str) -> Iterator[tuple[Any, Any]]:
    import torch

    for tokens, labels in chunks:
        if vocab_size is not None and max(tokens) >= vocab_size:
            raise UserError(f"tokenizer {source}: token id {max(tokens)} is not below the model's vocab size "
                            f"{vocab_size}")
        yield (torch.tensor([tokens], dtype=torch.long).to(device),  # [1, S]
               torch.tensor([labels], dtype=torch.long).to(device))  # [1, S]


def model_tokenizer(model_path: str | Path | None) -> Path:
    """The tokenizer the trainer uses with ``--finetune-data``: ``--model PATH``'s
    ``tokenizer.json``; a UserError without one."""
    if model_path is None or not (Path(model_path) / TOKENIZER_FILE).is_file():
        raise UserError("--finetune-data needs a tokenizer: pass --model PATH of a model folder with tokenizer.json")
    return Path(model_path) / TOKENIZER_FILE
