import random
import sys

import pytest

from autotune.errors import UserError
from autotune.workloads.sharegpt import approx_token_count, load_sharegpt


def words(n: int) -> str:
    """n words: n tokens for the word tokenizer of conftest."""
    return " ".join(["w"] * n)


def conv(*turns: str) -> dict:
    return {"id": "x", "conversations": [{"from": ("human", "gpt")[i % 2], "value": t}
                                         for i, t in enumerate(turns)]}


# (prompt words, answer words) -> kept by vLLM's filters?
FILTER_CASES = [
    ((4, 4), True),  # smallest kept
    ((3, 10), False),  # prompt < 4
    ((10, 3), False),  # answer < 4
    ((1024, 1024), True),  # prompt at its limit, sum at its limit
    ((1025, 5), False),  # prompt > 1024
    ((1000, 1049), False),  # sum 2049 > 2048
    ((20, 30), True),
]


def test_filters_with_exact_token_counts(write_sharegpt, word_tokenizer):
    data = [conv(words(p), words(a), "third turn ignored") for (p, a), _ in FILTER_CASES]
    data += [conv(words(50)), {"id": "empty", "conversations": []}]  # < 2 turns: dropped
    pairs = load_sharegpt(write_sharegpt(data), 100, seed=0, tokenizer_path=word_tokenizer)
    assert sorted(pairs) == sorted(pa for pa, kept in FILTER_CASES if kept)


def test_order_is_seeded_shuffle_then_first_n(write_sharegpt, word_tokenizer):
    lengths = [(4 + i, 10 + 2 * i) for i in range(30)]
    data = [conv(words(p), words(a)) for p, a in lengths]
    data.insert(5, conv(words(9)))  # one-turn conversations are dropped before the shuffle
    path = write_sharegpt(data)
    expected = list(lengths)
    random.Random(4).shuffle(expected)
    assert load_sharegpt(path, 10, seed=4, tokenizer_path=word_tokenizer) == expected[:10]
    assert load_sharegpt(path, 10, seed=4, tokenizer_path=word_tokenizer / "tokenizer.json") == expected[:10]
    assert load_sharegpt(path, 10, seed=5, tokenizer_path=word_tokenizer) != expected[:10]


def test_first_n_counts_kept_pairs_not_read_ones(write_sharegpt, word_tokenizer):
    data = [conv(words(2), words(9))] * 20 + [conv(words(6), words(7))] * 3
    assert load_sharegpt(write_sharegpt(data), 3, 0, word_tokenizer) == [(6, 7)] * 3


def test_fewer_usable_than_asked_returns_them(write_sharegpt, word_tokenizer):
    assert load_sharegpt(write_sharegpt([conv(words(5), words(5))]), 10, 0, word_tokenizer) == [(5, 5)]


def test_approximation_used_without_tokenizer(write_sharegpt):
    # 3 words: 3 tokens exactly (dropped) but ~4 estimated with BOS (kept)
    path = write_sharegpt([conv(words(3), "Hello, world!")])
    assert load_sharegpt(path, 5) == [(4, 5)]


@pytest.mark.parametrize("text, tokens", [
    ("Hello, world!", 5),  # Llama-3: <|begin_of_text|> Hello , world !
    ("The quick brown fox jumps over the lazy dog.", 11),
    ("def f(x):\n    return x**2\n", 11),
    ("12345 items...", 5),  # 123 | 45 | items | ... + BOS
    ("我爱北京天安门", 8),  # one per CJK character + BOS
    ("", 1),
])
def test_approx_token_count(text, tokens):
    assert approx_token_count(text) == tokens


def test_approx_splits_long_rare_words():
    assert approx_token_count(" cat") == 2
    assert approx_token_count(" pneumonoultramicroscopic") == 1 + 1 + (24 - 10 + 3) // 4


def test_missing_tokenizers_package_says_pip_install(write_sharegpt, word_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import raises ImportError
    with pytest.raises(UserError, match="pip install tokenizers"):
        load_sharegpt(write_sharegpt([conv(words(5), words(5))]), 1, 0, word_tokenizer)


def test_missing_tokenizer_file(write_sharegpt, tmp_path):
    with pytest.raises(UserError, match="tokenizer file not found"):
        load_sharegpt(write_sharegpt([conv(words(5), words(5))]), 1, 0, tmp_path)


def test_unreadable_tokenizer_file(write_sharegpt, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not a tokenizer", encoding="utf-8")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        load_sharegpt(write_sharegpt([conv(words(5), words(5))]), 1, 0, bad)


@pytest.mark.parametrize("data, match", [
    ({"conversations": []}, "expected a JSON array"),
    ([{"id": "a"}], "entry 0 has no \"conversations\" list"),
    ([conv("a b c d e", "f g h i j"), "text"], "entry 1 has no"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}], "entry 0: turns 0 and 1"),
    ([conv("hi there"), conv("a", "b c")], "no usable conversation"),
    ([], "no usable conversation"),
])
def test_bad_structure(write_sharegpt, data, match):
    path = write_sharegpt(data)
    with pytest.raises(UserError, match=match) as e:
        load_sharegpt(path, 5)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="ShareGPT file not found"):
        load_sharegpt(tmp_path / "nope.json", 5)


def test_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": 1,', encoding="utf-8")
    with pytest.raises(UserError, match="not readable JSON") as e:
        load_sharegpt(path, 5)
    assert "\n" not in str(e.value)
