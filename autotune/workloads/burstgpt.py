"""BurstGPT loader (``BurstGPT_without_fails_2.csv``): arrival gaps of the
trace, rescaled to a target rate, as the LLMStation artifact uses them.

Columns are matched by name, so both header forms are read: ``Timestamp``
(s), ``Model`` (``ChatGPT`` | ``GPT-4``), ``Request tokens``, ``Response
tokens``, ``Total tokens``, ``Log Type``, and in newer releases also
``Session ID`` and ``Elapsed time``.

The artifact's semantics, as implemented here:
- data rows (0-based, the header not counted) with index <= 5200 are skipped,
  so the first row read is data row 5201;
- of the rest, only ``ChatGPT`` rows count, in file order;
- N requests take N + 1 such timestamps, i.e. N gaps; the gaps are scaled by
  one factor so that their mean is 1/R s (the mean rate is R, the ratios
  between gaps, i.e. the bursts, are kept); request 0 is sent at t = 0 and
  request i at the sum of the first i scaled gaps (the N-th gap only sets the
  mean).
The file is streamed and reading stops once enough rows are found (the full
file has 3.78M rows).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from autotune.errors import UserError
from autotune.workloads.arrivals import check_count, check_rate, rescale_gaps

SKIP_ROWS_THROUGH = 5200  # data rows with index <= this are skipped
MODEL = "ChatGPT"  # rows of this model are used
REQUIRED_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


def load_burstgpt_timestamps(path: Path, count: int) -> np.ndarray:
    """The first ``count`` ChatGPT timestamps [count] in s after the skipped rows."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"BurstGPT file not found: {path}")
    out: list[float] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise UserError(f"BurstGPT file {path}: missing column(s) {', '.join(missing)}")
            ts_col, model_col = header.index("Timestamp"), header.index("Model")
            for index, row in enumerate(reader):
                if len(out) == count:
                    break
                if index <= SKIP_ROWS_THROUGH or not row:
                    continue
                if len(row) != len(header):
                    raise UserError(f"BurstGPT file {path}: line {reader.line_num} has {len(row)} fields, "
                                    f"the header {len(header)}")
                if row[model_col].strip() != MODEL:
                    continue
                try:
                    out.append(float(row[ts_col]))
                except ValueError:
                    raise UserError(f"BurstGPT file {path}: line {reader.line_num}: "
                                    f"Timestamp {row[ts_col]!r} is not a number") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"BurstGPT file {path} is not a readable CSV: {str(e).splitlines()[0]}") from None
    if len(out) < count:
        raise UserError(f"BurstGPT file {path}: only {len(out)} {MODEL} rows after data row "
                        f"{SKIP_ROWS_THROUGH}, need {count}")
    return np.asarray(out, dtype=np.float64)


def burstgpt_arrivals(path: Path, num_requests: int, rate_req_s: float) -> np.ndarray:
    """Send times [num_requests] in s: the trace's gaps at mean rate ``rate_req_s``, first at 0."""
    check_count(num_requests)
    check_rate(rate_req_s)
    timestamps_s = load_burstgpt_timestamps(path, num_requests + 1)
    try:
        return rescale_gaps(timestamps_s, rate_req_s)[:num_requests]
    except UserError as e:
        raise UserError(f"BurstGPT file {path}: {e}") from None
