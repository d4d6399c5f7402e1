"""Progress display: the trial table (a pure function of rows), the header,
the plain one-line-per-trial reporter, and the live reporter on a terminal."""

from __future__ import annotations

import copy
import io

import optuna
import pytest
from rich.console import Console

from autotune.backends import make_backend
from autotune.confirm import Confirmation
from autotune.live import MAX_ROWS, LiveReporter, PlainReporter, confirmation_text, header_text, trial_table
from autotune.results import StudyResult, TrialRow
from autotune.slo import SloSpec
from autotune.study import StudyConfig, prepare, run_study
from autotune.testing.records import made_up_metrics
from autotune.metrics import TrialMetrics
from autotune.trial import Outcome

KNOBS = ["mps_active_thread_pct"]


def _row(number: int, pct: int, ttft_ms: float, tpot_ms: float, peft: float, outcome: str,
         error: str | None = None) -> TrialRow:
    metrics = made_up_metrics(peft, ttft_ms, tpot_ms)
    return TrialRow(number, "COMPLETE", outcome, {"mps_active_thread_pct": pct}, metrics, {}, error)


def _segments(renderable, width: int = 200):
    """(text, style) of every non-blank piece the console draws."""
    console = Console(record=True, width=width)
    return [(s.text.strip(), s.style) for s in console.render(renderable, console.options) if s.text.strip()]


def _color(segments, text: str) -> str | None:
    styles = [style for t, style in segments if t == text]
    assert len(styles) == 1, f"{text!r} drawn {len(styles)} times"
    style = styles[0]
    return style.color.name if style is not None and style.color is not None else None


def _render_text(renderable, width: int = 200) -> str:
    console = Console(record=True, width=width)
    console.print(renderable)
    return console.export_text()


def test_latencies_are_coloured_against_the_slo():
    rows = [
        _row(0, 60, 59.5, 8.25, 1.8, "feasible"),  # both below the limits: green
        _row(1, 80, 69.5, 12.75, 2.4, "infeasible"),  # both above: red
        _row(2, 70, 64.5, 11.25, 2.1, "infeasible"),  # TTFT above, TPOT below
    ]
    segs = _segments(trial_table(rows, KNOBS, ttft_limit_ms=60.0, tpot_limit_ms=12.0))
    assert _color(segs, "59.5") == "green" and _color(segs, "8.25") == "green"
    assert _color(segs, "69.5") == "red" and _color(segs, "12.75") == "red"
    assert _color(segs, "64.5") == "red" and _color(segs, "11.25") == "green"
    assert _color(segs, "yes") == "green"
    assert [t for t, _ in segs].count("no") == 2


def test_without_an_slo_latencies_are_not_coloured():
    segs = _segments(trial_table([_row(0, 60, 59.5, 8.25, 1.8, "feasible")], KNOBS, None, None))
    assert _color(segs, "59.5") is None and _color(segs, "8.25") is None


def test_crashed_and_running_rows():
    crashed = TrialRow(3, "COMPLETE", "crashed", {"mps_active_thread_pct": 35}, made_up_metrics(wall_s=1.0), {},
                       "trainer out of memory")
    running = TrialRow(4, "RUNNING", "running", {}, TrialMetrics(), {})
    table = trial_table([crashed, running], KNOBS, 60.0, 12.0)
    text = _render_text(table)
    assert "crashed: trainer out of memory" in text
    assert "running" in text
    segs = _segments(table)
    assert _color(segs, "crashed") == "red"
    assert _color(segs, "running") == "cyan"
    # No latency or throughput measured: dashes, not zeros.
    lines = [line for line in text.splitlines() if " 3 " in line or " 4 " in line]
    assert len(lines) == 2 and all("0.000" not in line and "-" in line for line in lines)


def test_table_shows_the_knob_values_and_the_throughput():
    text = _render_text(trial_table([_row(7, 45, 50.0, 9.0, 1.35, "feasible")], KNOBS, 60.0, 12.0))
    header = next(line for line in text.splitlines() if "mps_active_thread_pct" in line)
    for col in ("#", "P99 TTFT ms", "P99 TPOT ms", "PEFT samples/s", "feasible", "state"):
        assert col in header
    row = next(line for line in text.splitlines() if " 7 " in line)
    for cell in ("45", "50.0", "9.00", "1.350", "yes", "feasible"):
        assert cell in row


def test_the_best_feasible_row_stays_when_rows_overflow():
    rows = [_row(0, 60, 50.0, 8.0, 9.0, "feasible")]  # the best, and the oldest
    rows += [_row(i, 80, 70.0, 8.0, 2.0, "infeasible") for i in range(1, 40)]
    table = trial_table(rows, KNOBS, 60.0, 12.0)
    assert table.row_count == MAX_ROWS
    numbers = [int(c) for c in table.columns[0]._cells]
    assert numbers == [0, *range(40 - MAX_ROWS + 1, 40)]  # the best, then the most recent


def test_max_rows_none_shows_every_row():
    rows = [_row(i, 80, 70.0, 8.0, 2.0, "infeasible") for i in range(2 * MAX_ROWS)]
    assert trial_table(rows, KNOBS, 60.0, 12.0, max_rows=None).row_count == 2 * MAX_ROWS
    assert trial_table(rows, KNOBS, 60.0, 12.0, max_rows=5).row_count == 5


def test_rows_that_fit_are_all_shown_in_order():
    rows = [_row(i, 80, 70.0, 8.0, 2.0, "infeasible") for i in range(MAX_ROWS)]
    table = trial_table(rows, KNOBS, 60.0, 12.0)
    assert [int(c) for c in table.columns[0]._cells] == list(range(MAX_ROWS))


def test_trial_table_is_a_pure_function_of_its_rows():
    rows = [_row(0, 60, 59.5, 8.25, 1.8, "feasible"), _row(1, 80, 69.5, 12.75, 2.4, "infeasible")]
    before = copy.deepcopy(rows)  # not the same objects: a table that edits a row's dicts is caught
    first = _render_text(trial_table(rows, KNOBS, 60.0, 12.0))
    assert _render_text(trial_table(rows, KNOBS, 60.0, 12.0)) == first
    assert rows == before
    assert "59.5" in first and "12.75" in first and "2.400" in first  # the rows' own numbers, as drawn


# ---------------------------------------------------------------- with a real study context


def _config(tmp_path, **kw) -> StudyConfig:
    base = dict(system="vllm-torchtune", figure="fig8a", rate_req_s=4.0, num_prompts=12, sampler="grid",
                runs_dir=tmp_path, slo=SloSpec(ttft_p99_ms=60.0, tpot_p99_ms=12.0))
    base.update(kw)
    return StudyConfig(**base)


@pytest.fixture
def ctx(tmp_path):
    with make_backend("sim") as backend:
        yield prepare(_config(tmp_path), backend)


def test_header_says_none_yet_then_the_best(ctx):
    from autotune.slo import ResolvedSlo

    ctx.slo = ResolvedSlo(60.0, 12.0, "absolute", "absolute")
    empty = header_text(ctx, []).plain
    assert "VLLM" in empty.upper() and "fig8a" in empty and "4 req/s (--rate)" in empty
    assert "SLO: P99 TTFT ≤ 60.0 ms, P99 TPOT ≤ 12.00 ms" in empty
    assert empty.splitlines()[-1] == "best feasible: none yet"
    only_infeasible = header_text(ctx, [_row(0, 80, 69.5, 8.0, 2.4, "infeasible")]).plain
    assert only_infeasible.splitlines()[-1] == "best feasible: none yet"
    rows = [_row(0, 80, 69.5, 8.0, 2.4, "infeasible"), _row(1, 60, 59.0, 8.0, 1.8, "feasible"),
            _row(2, 50, 55.0, 8.0, 1.5, "feasible"), _row(3, 60, 58.0, 8.0, 1.8, "feasible")]
    best = header_text(ctx, rows).plain.splitlines()[-1]
    assert best == "best feasible: #1 1.800 samples/s  mps_active_thread_pct=60"


def test_plain_reporter_writes_one_line_per_trial(ctx):
    stream = io.StringIO()
    reporter = PlainReporter(stream)
    t = optuna.trial.create_trial(
        value=1.8, params={"mps_active_thread_pct": 60},
        distributions={"mps_active_thread_pct": optuna.distributions.IntDistribution(10, 100, step=5)},
        user_attrs={"outcome": "feasible", "metrics": made_up_metrics(1.8, 59.04, 8.004).to_dict()},
    )
    t.number = 5
    reporter.on_trial_end(ctx, t)
    assert stream.getvalue() == ("trial 5: mps_active_thread_pct=60 ttft_p99_ms=59.0 tpot_p99_ms=8.00 "
                                 "peft_samples_per_s=1.800 feasible\n")


def test_plain_reporter_over_a_study(tmp_path):
    stream = io.StringIO()
    with make_backend("sim") as backend:
        run_study(_config(tmp_path), backend, 3, PlainReporter(stream))
    lines = stream.getvalue().splitlines()
    trial_lines = [line for line in lines if line.startswith("trial ")]
    assert [line.split(":")[0] for line in trial_lines] == ["trial 0", "trial 1", "trial 2"]
    assert all(" peft_samples_per_s=" in line for line in trial_lines)
    assert lines[0].startswith("study vllm-torchtune-fig8a-4rps-sim: vllm-torchtune fig8a 4 req/s (--rate)")
    assert sum(line.startswith("reference ") for line in lines) == 2
    assert sum(line.startswith("SLO: ") for line in lines) == 1
    assert all("\x1b[" not in line for line in lines)  # no terminal codes


def test_live_reporter_on_a_terminal(tmp_path):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    reporter = LiveReporter(console)
    with make_backend("sim") as backend:
        ctx = run_study(_config(tmp_path, sampler="random"), backend, 2, reporter)
    assert reporter.live is None  # stopped at the end
    assert [r.number for r in reporter.rows] == [0, 1]
    text = out.getvalue()
    assert "best feasible:" in text and "P99 TTFT ms" in text
    assert len(ctx.study.trials) == 2


def test_confirmation_lines_are_coloured_by_outcome():
    records = [(4, Confirmation(1_000_001, Outcome.FEASIBLE, made_up_metrics(1.5, 50.0, 8.0))),
               (4, Confirmation(1_000_002, Outcome.INFEASIBLE, made_up_metrics(1.5, 70.0, 8.1))),
               (2, Confirmation(1_000_001, Outcome.CRASHED, error="vLLM server died"))]
    segs = _segments(confirmation_text(records))
    text = " ".join(t for t, _ in segs)
    assert "confirm #4 on workload seed 1000001: P99 TTFT 50.0 ms, P99 TPOT 8.00 ms, 1.500 samples/s" in text
    styles = {t: str(s) for t, s in segs}
    assert styles["feasible"] == "green" and styles["infeasible"] == "red"
    assert styles["crashed: vLLM server died"] == "red"


def test_live_reporter_shows_confirmations(tmp_path):
    out = io.StringIO()
    reporter = LiveReporter(Console(file=out, force_terminal=True, width=200))
    with make_backend("sim") as backend:
        # SLOs no setting can miss: the best is confirmed on the first try
        config = _config(tmp_path, sampler="random", confirm_workloads=1,
                         slo=SloSpec(ttft_p99_ms=10_000.0, tpot_p99_ms=1_000.0))
        ctx = run_study(config, backend, 3, reporter)
    best = StudyResult.of(ctx.study).best.number
    assert [(n, c.workload_seed, c.outcome) for n, c in reporter.confirmed] == [(best, 1_000_001, "feasible")]
    assert f"confirm #{best} on workload seed 1000001" in out.getvalue()


def test_a_pareto_study_shows_its_pareto_optimal_trials(tmp_path):
    out = io.StringIO()
    reporter = LiveReporter(Console(file=out, force_terminal=True, width=200))
    with make_backend("sim") as backend:
        ctx = run_study(_config(tmp_path, sampler="random", objective="pareto", slo=SloSpec()), backend, 3, reporter)
    front = {t.number for t in ctx.study.best_trials}
    assert front  # some trial met the SLO
    header = header_text(ctx, reporter.rows, frozenset(front)).plain
    assert "objectives: max PEFT samples/s, min P99 TTFT, min P99 TPOT" in header
    assert header.splitlines()[-1].startswith(f"Pareto-optimal feasible trials: {len(front)}")
    table = _render_text(trial_table(reporter.rows, ctx.space.names, 500.0, 50.0, pareto=front))
    cells = [line.split("│")[1:-1] for line in table.splitlines() if line.startswith("│")]
    assert "Pareto" in table and {int(c[0]) for c in cells if c[-2].strip() == "yes"} == front
    assert "Pareto-optimal feasible trials" in out.getvalue()  # what the terminal showed
    one = _render_text(trial_table(reporter.rows, ctx.space.names, 60.0, 12.0))
    assert "Pareto" not in one  # a study of one objective has no such column
