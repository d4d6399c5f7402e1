import numpy as np
import pytest

from autotune.errors import UserError
from autotune.workloads.burstgpt import SKIP_ROWS_THROUGH, burstgpt_arrivals, load_burstgpt_timestamps

from .conftest import NEW_HEADER, OLD_HEADER

NUM_ROWS = SKIP_ROWS_THROUGH + 1 + 90  # data rows 0..5290


def _chatgpt_after_skip(rows, count):
    return [t for i, (t, model) in enumerate(rows) if i > SKIP_ROWS_THROUGH and model == "ChatGPT"][:count]


@pytest.mark.parametrize("header", [OLD_HEADER, NEW_HEADER])
def test_skips_rows_through_5200_and_gpt4(write_burstgpt, burstgpt_rows, header):
    rows = burstgpt_rows(NUM_ROWS)
    rows[SKIP_ROWS_THROUGH] = (rows[SKIP_ROWS_THROUGH][0], "ChatGPT")  # last skipped row
    rows[SKIP_ROWS_THROUGH + 1] = (rows[SKIP_ROWS_THROUGH + 1][0], "ChatGPT")  # first row read
    got = load_burstgpt_timestamps(write_burstgpt(rows, header), 40)
    assert got[0] == rows[SKIP_ROWS_THROUGH + 1][0]
    assert got.tolist() == _chatgpt_after_skip(rows, 40)
    assert len(_chatgpt_after_skip(rows, 40)) == 40


@pytest.mark.parametrize("header", [OLD_HEADER, NEW_HEADER, list(reversed(NEW_HEADER))])
def test_arrivals_rescaled_to_rate_keeping_shape(write_burstgpt, burstgpt_rows, header):
    rows = burstgpt_rows(NUM_ROWS)
    n, rate = 30, 0.88  # requests, req/s
    t = burstgpt_arrivals(write_burstgpt(rows, header), n, rate)
    raw = np.array(_chatgpt_after_skip(rows, n + 1))  # N + 1 timestamps, N gaps
    assert t.shape == (n,)
    assert t[0] == 0.0
    factor = (1 / rate) / np.diff(raw).mean()  # mean of the N gaps is 1/R
    assert t == pytest.approx(factor * (raw[:n] - raw[0]))
    # the burst shape: zero gaps stay zero, ratios of gaps are kept
    raw_gaps, gaps = np.diff(raw[:n]), np.diff(t)
    assert np.count_nonzero(raw_gaps == 0) > 0
    assert np.array_equal(gaps == 0, raw_gaps == 0)
    assert gaps[raw_gaps > 0] / raw_gaps[raw_gaps > 0] == pytest.approx(factor)


def test_streams_and_stops_after_enough_rows(write_burstgpt, burstgpt_rows):
    # a broken line after the rows needed is never read
    path = write_burstgpt(burstgpt_rows(NUM_ROWS), tail="oops,not,a,row\n")
    assert len(burstgpt_arrivals(path, 20, 1.0)) == 20
    with pytest.raises(UserError, match="has 4 fields"):
        burstgpt_arrivals(path, 60, 1.0)  # needs 61 ChatGPT rows: 60 lie before the broken line


def test_not_enough_chatgpt_rows(write_burstgpt, burstgpt_rows):
    path = write_burstgpt(burstgpt_rows(NUM_ROWS))
    with pytest.raises(UserError, match=r"only 60 ChatGPT rows after data row 5200, need 101"):
        burstgpt_arrivals(path, 100, 1.0)


def test_missing_columns(write_burstgpt, burstgpt_rows):
    header = [c for c in OLD_HEADER if c not in ("Model", "Log Type")]
    path = write_burstgpt([], header=header)
    with pytest.raises(UserError, match="missing column\\(s\\) Model, Log Type"):
        burstgpt_arrivals(path, 5, 1.0)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="missing column"):
        load_burstgpt_timestamps(path, 5)


def test_bad_timestamp(write_burstgpt, burstgpt_rows):
    rows = burstgpt_rows(NUM_ROWS)
    rows[SKIP_ROWS_THROUGH + 1] = ("soon", "ChatGPT")
    with pytest.raises(UserError, match=r"line 5203: Timestamp 'soon' is not a number"):
        load_burstgpt_timestamps(write_burstgpt(rows), 5)


def test_equal_timestamps_cannot_be_rescaled(write_burstgpt):
    path = write_burstgpt([(7.0, "ChatGPT")] * (SKIP_ROWS_THROUGH + 20))
    with pytest.raises(UserError, match="burstgpt.csv: all timestamps are equal"):
        burstgpt_arrivals(path, 5, 1.0)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="BurstGPT file not found"):
        burstgpt_arrivals(tmp_path / "nope.csv", 5, 1.0)


def test_binary_file(tmp_path):
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\xff\xfe\x00garbage\x00")
    with pytest.raises(UserError, match="BurstGPT file") as e:
        burstgpt_arrivals(path, 5, 1.0)
    assert "\n" not in str(e.value)
