"""ShareGPT loader (``ShareGPT_V3_unfiltered_cleaned_split.json``) with vLLM's
sampling rules.

The file is a JSON array of ``{"id", "conversations": [{"from", "value"}, ...]}``.
As vLLM's ``sample_sharegpt_requests``: keep conversations with >= 2 turns;
prompt = turn 0, answer = turn 1; shuffle the list with the seed; walk it in
order and keep a pair unless prompt < 4 or answer < 4 tokens, prompt > 1024
tokens or prompt + answer > 2048 tokens; stop at ``num_requests`` pairs.

Token counts are exact with a tokenizer (``tokenizer.json``, counted as a
Hugging Face tokenizer counts with special tokens, so Llama-3's BOS is
included, as in vLLM). Without one, ``approx_token_count`` estimates them; see
``APPROXIMATION``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from autotune.errors import UserError

MIN_TOKENS = 4  # prompt and answer: fewer is dropped
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048  # prompt + answer (vLLM's --max-model-len here)

# Pieces after Llama-3's pre-tokenizer split (its regex, with \p{L} written
# as [^\W\d_] and \p{N} as \d so that Python's re can run it).
_PIECES = re.compile(
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])"  # contractions
    r"|(?:[^\r\n\w]|_)?[^\W\d_]+"  # a word, with one leading space or mark
    r"|\d{1,3}"  # numbers in groups of up to 3 digits
    r"| ?(?:[^\s\w]|_)+[\r\n]*"  # punctuation runs
    r"|\s*[\r\n]+"  # line breaks
    r"|\s+(?!\S)|\s+"  # other whitespace
)
_LONG_WORD = 10  # Latin letters; a longer word counts +1 token per 4 letters beyond
_PUNCT_PER_TOKEN = 3  # characters of a punctuation run per token
_LATIN_END = 0x24F  # last code point of Latin Extended-B

APPROXIMATION = (
    "approximate token counts: Llama-3 pre-tokenizer pieces (1 token per word, "
    "3 digits or 3 punctuation marks; +1 per 4 letters past 10; 1 per non-Latin "
    "character) + BOS; an estimate not checked against Llama-3: about 10% off for "
    "English prose, more for code and non-English text; --tokenizer gives exact counts"
)


def _piece_tokens(piece: str) -> int:
    core = piece.strip()
    if not core:  # whitespace run
        return 1
    if not any(c.isalpha() for c in core):  # digits (<= 3) or punctuation run
        return -(-len(core) // _PUNCT_PER_TOKEN)
    non_latin = sum(1 for c in core if ord(c) > _LATIN_END)
    latin = sum(1 for c in core if c.isalpha() and ord(c) <= _LATIN_END)
    latin_tokens = 1 + max(0, latin - _LONG_WORD + 3) // 4 if latin else 0
    return non_latin + latin_tokens


def approx_token_count(text: str) -> int:
    """Estimated Llama-3 token count of ``text``, BOS included.

    Llama-3's 128k-entry BPE holds almost every common English word (with its
    leading space) as one token, so the pieces of its pre-tokenizer are a close
    count for English prose; rare long words split further (+1 per 4 letters
    past 10), long punctuation runs too (1 per 3 marks); characters outside
    the Latin script count one token each (about right for CJK, high for
    Cyrillic or Greek). Not measured against the real tokenizer: expect about
    10% error per English text, more for code and other languages.
    """
    return 1 + sum(_piece_tokens(m.group()) for m in _PIECES.finditer(text))


def load_tokenizer(path: Path) -> Callable[[str], int]:
    """A token counter from ``tokenizer.json`` (a file, or a directory holding it)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("exact token counts need the tokenizers package: pip install tokenizers") from None
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"tokenizer file not found: {file}")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exception subclasses
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read tokenizer {file}: {reason}") from None
    return lambda text: len(tokenizer.encode(text, add_special_tokens=True).ids)


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    """(prompt, answer) texts of the conversations with >= 2 turns, file order."""
    if not path.is_file():
        raise UserError(f"ShareGPT file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"ShareGPT file {path} is not readable JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, list):
        raise UserError(f"ShareGPT file {path}: expected a JSON array of conversations, got {type(data).__name__}")
    pairs: list[tuple[str, str]] = []
    for i, entry in enumerate(data):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            raise UserError(f"ShareGPT file {path}: entry {i} has no \"conversations\" list")
        if len(turns) < 2:
            continue
        texts = [t.get("value") if isinstance(t, dict) else None for t in turns[:2]]
        if not all(isinstance(t, str) for t in texts):
            raise UserError(f"ShareGPT file {path}: entry {i}: turns 0 and 1 need a string \"value\"")
        pairs.append((texts[0], texts[1]))
    return pairs


def load_sharegpt(path: Path, num_requests: int, seed: int = 0,
                  tokenizer_path: Path | None = None) -> list[tuple[int, int]]:
    """Up to ``num_requests`` (prompt_len, output_len) pairs in tokens, vLLM's
    way. Fewer when the file has fewer usable conversations (at least one)."""
    path = Path(path)
    count = load_tokenizer(tokenizer_path) if tokenizer_path is not None else approx_token_count
    pairs = _read_pairs(path)
    random.Random(seed).shuffle(pairs)
    out: list[tuple[int, int]] = []
    for prompt, answer in pairs:
        if len(out) == num_requests:
            break
        prompt_len, output_len = count(prompt), count(answer)
        if prompt_len < MIN_TOKENS or output_len < MIN_TOKENS:
            continue
        if prompt_len > MAX_PROMPT_TOKENS or prompt_len + output_len > MAX_TOTAL_TOKENS:
            continue
        out.append((prompt_len, output_len))
    if not out:
        raise UserError(
            f"ShareGPT file {path}: no usable conversation (need >= 2 turns, prompt and answer >= "
            f"{MIN_TOKENS} tokens, prompt <= {MAX_PROMPT_TOKENS}, prompt + answer <= {MAX_TOTAL_TOKENS})")
    return out
