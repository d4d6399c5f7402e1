"""Writers of small ShareGPT, BurstGPT and tokenizer files for the loader tests."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest

OLD_HEADER = ["Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type"]
NEW_HEADER = ["Timestamp", "Session ID", "Model", "Request tokens", "Response tokens", "Total tokens",
              "Elapsed time", "Log Type"]


@pytest.fixture
def write_sharegpt(tmp_path: Path) -> Callable[[object], Path]:
    def write(data: object, name: str = "sharegpt.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(data), encoding="utf-8")
        return path
    return write


@pytest.fixture
def word_tokenizer(tmp_path: Path) -> Path:
    """A directory holding a WordLevel tokenizer.json: one token per whitespace-split word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "w": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _burstgpt_rows(num_rows: int) -> list[tuple[float, str]]:
    """(timestamp s, model) of data rows 0..num_rows-1: every third row GPT-4,
    gaps cycling 0, 1, 3, 7 s (bursts and pauses, zero gaps included)."""
    rows, t = [], 100.0
    for i in range(num_rows):
        t += (0, 1, 3, 7)[i % 4]
        rows.append((t, "GPT-4" if i % 3 == 2 else "ChatGPT"))
    return rows


@pytest.fixture
def burstgpt_rows() -> Callable[[int], list[tuple[float, str]]]:
    return _burstgpt_rows


@pytest.fixture
def write_burstgpt(tmp_path: Path) -> Callable[..., Path]:
    def write(rows: list[tuple[float, str]], header: list[str] = OLD_HEADER, tail: str = "",
              name: str = "burstgpt.csv") -> Path:
        path = tmp_path / name
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i, (t, model) in enumerate(rows):
                values = {"Timestamp": str(t), "Model": model, "Request tokens": 100 + i % 7,
                          "Response tokens": 50, "Total tokens": 150 + i % 7, "Log Type": "Conversation log",
                          "Session ID": f"s{i}", "Elapsed time": 1.5}
                w.writerow([values[c] for c in header])
            f.write(tail)
        return path
    return write
