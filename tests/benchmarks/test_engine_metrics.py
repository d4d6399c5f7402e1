"""vLLM's Prometheus metrics read back: a run's change of each histogram, its
mean and the share above a bucket bound, and the GPU / simulator table on the
committed H200 runs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from autotune.sim.backend import SimBackend  # noqa: E402
from benchmarks.fidelity.engine_metrics import Histogram, compare, main, markdown, parse_prom  # noqa: E402
from benchmarks.fidelity.rows import RowsFile  # noqa: E402

NAME = "vllm:time_to_first_token_seconds"


def _prom(buckets: dict[str, float], total_s: float, count: float) -> str:
    lines = ["# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
             "# TYPE vllm:time_to_first_token_seconds histogram"]
    lines += [f'{NAME}_bucket{{engine="0",le="{le}",model_name="m"}} {v}' for le, v in buckets.items()]
    lines += [f'{NAME}_sum{{engine="0",model_name="m"}} {total_s}', f'{NAME}_count{{engine="0",model_name="m"}} {count}',
              'vllm:num_requests_running{engine="0",model_name="m"} 3.0', ""]
    return "\n".join(lines)


def test_a_run_is_the_difference_of_two_snapshots():
    before = parse_prom(_prom({"0.04": 10, "0.06": 12, "0.08": 12, "+Inf": 12}, 0.5, 12))
    after = parse_prom(_prom({"0.04": 16, "0.06": 20, "0.08": 21, "+Inf": 22}, 1.0, 22))
    h = Histogram.delta(before, after, NAME)
    assert h.count == 10 and h.sum_s == pytest.approx(0.5)
    assert h.mean_ms == pytest.approx(50.0)
    # 10 requests in the run: 6 at or below 40 ms, 8 at or below 60, 9 at or below 80
    assert h.share_above(40) == pytest.approx(0.4)
    assert h.share_above(60) == pytest.approx(0.2)
    assert h.share_above(80) == pytest.approx(0.1)
    assert math.isnan(h.share_above(50))  # not a bucket bound


def test_comments_and_other_metrics_are_skipped():
    parsed = parse_prom(_prom({"0.1": 1, "+Inf": 1}, 0.05, 1))
    assert (f"{NAME}_count", '{engine="0",model_name="m"}') in parsed
    assert all(not name.startswith("#") for name, _ in parsed)
    assert Histogram.delta({}, parsed, "vllm:inter_token_latency_seconds").count == 0


def test_the_committed_h200_runs_compare_with_the_simulator():
    folder = REPO / "benchmarks/results/fidelity"
    rows = RowsFile.load(folder / "h200-gpu-rows-sitting3.json")
    table = compare(rows, folder / "h200-runs/sitting3-server-metrics", SimBackend("h200"))
    runs = {row["run"] for row in table}
    assert "vllm-torchtune-fig9a-24rps-serving-alone-run0" in runs and len(runs) == 8
    alone = next(row for row in table if row["run"] == "vllm-torchtune-fig9a-24rps-serving-alone-run0")
    gpu_ttft_ms, sim_ttft_ms = alone["ttft_mean_ms"]
    assert 30 < gpu_ttft_ms < 50 and 20 < sim_ttft_ms < 60  # GPU: 38.5 ms
    text = markdown(table, "h200")
    assert text.count("\n| vllm-torchtune-") == 8


def test_a_missing_folder_or_rows_file_is_one_line_and_exit_2(tmp_path, capsys):
    rows = str(REPO / "benchmarks/results/fidelity/h200-gpu-rows-sitting3.json")
    assert main(["--gpu", rows, "--metrics", str(tmp_path / "nowhere")]) == 2
    assert main(["--gpu", str(tmp_path / "none.json"), "--metrics", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("engine_metrics: error: ") for line in err), err
