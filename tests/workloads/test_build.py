import json
from dataclasses import replace

import numpy as np
import pytest

from autotune.errors import UserError
from autotune.workloads import Workload, WorkloadOptions, build_workload
from autotune.workloads.burstgpt import SKIP_ROWS_THROUGH


def conv(prompt_words: int, answer_words: int) -> dict:
    return {"id": "x", "conversations": [{"from": "human", "value": " ".join(["w"] * prompt_words)},
                                         {"from": "gpt", "value": " ".join(["w"] * answer_words)}]}


@pytest.fixture
def sharegpt(write_sharegpt):
    return write_sharegpt([conv(4 + i, 8 + i) for i in range(50)])


@pytest.fixture
def burstgpt(write_burstgpt, burstgpt_rows):
    return write_burstgpt(burstgpt_rows(SKIP_ROWS_THROUGH + 1 + 90))


@pytest.mark.parametrize("arrivals", ["poisson", "gamma", "burstgpt"])
def test_synthetic_workload(arrivals):
    w = build_workload(WorkloadOptions(arrivals, rate_req_s=2.0, num_prompts=300, burstiness=0.5))
    assert len(w) == 300
    assert w.synthetic
    assert "synthetic ShareGPT-like lengths" in w.description
    assert ("synthetic BurstGPT-like arrivals" in w.description) == (arrivals == "burstgpt")
    assert "\n" not in w.description
    assert w.requests[0].arrival_s == 0.0
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(w.requests, w.requests[1:]))
    assert (w.rate_req_s, w.seed) == (2.0, 0)
    assert all(r.adapter is None for r in w.requests)


def test_same_options_same_workload_other_seed_differs():
    opts = WorkloadOptions("gamma", 1.0, 100, seed=3, burstiness=0.7)
    assert build_workload(opts) == build_workload(opts)
    other = build_workload(replace(opts, seed=4))
    assert other.requests != build_workload(opts).requests


@pytest.mark.parametrize("dist, expected", [
    ("uniform", [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]),
    ("skewed", [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]),
    ("none", [None] * 10),
    (None, [None] * 10),
])
def test_adapters(dist, expected):
    w = build_workload(WorkloadOptions("poisson", 1.0, 10, lora_dist=dist))
    assert [r.adapter for r in w.requests] == expected


def test_uniform_over_other_adapter_count():
    w = build_workload(WorkloadOptions("poisson", 1.0, 5, lora_dist="uniform", num_adapters=3))
    assert [r.adapter for r in w.requests] == [0, 1, 2, 0, 1]


def test_datasets_not_synthetic(sharegpt, burstgpt, word_tokenizer):
    w = build_workload(WorkloadOptions("burstgpt", 0.88, 40, sharegpt_path=sharegpt, burstgpt_path=burstgpt,
                                       tokenizer_path=word_tokenizer))
    assert not w.synthetic
    assert {(r.prompt_len, r.output_len) for r in w.requests} <= {(4 + i, 8 + i) for i in range(50)}
    assert len({r.prompt_len for r in w.requests}) == 40  # 40 distinct conversations, none repeated
    assert "ShareGPT prompts from sharegpt.json" in w.description
    assert "BurstGPT arrival gaps from burstgpt.csv rescaled to 0.88 req/s" in w.description
    assert "approximate" not in w.description


def test_sharegpt_without_tokenizer_announces_approximation(sharegpt):
    w = build_workload(WorkloadOptions("poisson", 1.0, 10, sharegpt_path=sharegpt))
    assert not w.synthetic
    assert "approximate token counts" in w.description
    # the approximation counts BOS: words + 1
    assert {(r.prompt_len, r.output_len) for r in w.requests} <= {(5 + i, 9 + i) for i in range(50)}


def test_burstgpt_file_with_synthetic_lengths_is_synthetic(burstgpt):
    w = build_workload(WorkloadOptions("burstgpt", 1.0, 10, burstgpt_path=burstgpt))
    assert w.synthetic
    assert "BurstGPT arrival gaps" in w.description


def test_short_sharegpt_is_oversampled(write_sharegpt):
    path = write_sharegpt([conv(10, 20), conv(30, 40)])
    w = build_workload(WorkloadOptions("poisson", 1.0, 7, sharegpt_path=path))
    assert len(w) == 7
    assert {(r.prompt_len, r.output_len) for r in w.requests} == {(11, 21), (31, 41)}
    assert "2 usable, oversampled to 7" in w.description
    assert w == build_workload(WorkloadOptions("poisson", 1.0, 7, sharegpt_path=path))


def test_write_jsonl_format(tmp_path):
    w = build_workload(WorkloadOptions("poisson", 2.0, 4, lora_dist="skewed"))
    n = build_workload(WorkloadOptions("poisson", 2.0, 4))
    w.write_jsonl(tmp_path / "w.jsonl")
    n.write_jsonl(tmp_path / "n.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in rows] == [["adapter", "arrival_s", "output_len", "prompt_len"]] * 4
    assert [r["adapter"] for r in rows] == [0, 1, 0, 1]
    assert [r["arrival_s"] for r in rows] == [r.arrival_s for r in w.requests]
    assert '"adapter": null' in (tmp_path / "n.jsonl").read_text()


def test_poisson_rate_over_many_requests():
    w = build_workload(WorkloadOptions("poisson", 3.0, 5000))
    assert (len(w) - 1) / w.duration_s == pytest.approx(3.0, rel=0.04)
    assert isinstance(w, Workload)
    assert np.mean([r.prompt_len for r in w.requests]) == pytest.approx(215, rel=0.04)


@pytest.mark.parametrize("changes, match", [
    ({"rate_req_s": 0.0}, "rate"),
    ({"rate_req_s": -2.0}, "rate"),
    ({"num_prompts": 0}, "number of prompts"),
    ({"seed": -1}, "seed"),
    ({"burstiness": 0.0}, "burstiness"),
    ({"arrivals": "weibull"}, "unknown arrival process 'weibull'"),
    ({"lora_dist": "zipf"}, "unknown LoRA distribution 'zipf'"),
    ({"lora_dist": "skewed", "num_adapters": 1}, "needs >= 2 adapters"),
    ({"lora_dist": "uniform", "num_adapters": 0}, "needs >= 1 adapters"),
])
def test_bad_options(changes, match):
    opts = replace(WorkloadOptions("poisson", 1.0, 10), **changes)
    with pytest.raises(UserError, match=match):
        build_workload(opts)


def test_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="ShareGPT file not found"):
        build_workload(WorkloadOptions("poisson", 1.0, 10, sharegpt_path=tmp_path / "a.json"))
    with pytest.raises(UserError, match="BurstGPT file not found"):
        build_workload(WorkloadOptions("burstgpt", 1.0, 10, burstgpt_path=tmp_path / "b.csv"))
