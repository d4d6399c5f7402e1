"""``autotune figure``: the rows computed from made-up studies (0 where no
setting meets the SLO, LLMStation's ratio with inf and blank), the CSV, the
live view, and a small run end to end on the simulator (CSV, JSON, PNG, SVG;
a resume that adds nothing; the same CSV from one worker and from two; Ctrl-C
with workers running), and bad input."""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from autotune.figure import (CSV_COLUMNS, FigureRow, comparison_text, csv_text, default_rates, figure_data,
                             figure_rows, parse_rates, parse_systems)
from autotune.figure.run import ProgressEntry, progress_table
from autotune.errors import UserError
from autotune.results import StudyResult, TrialRow, load_study_file
from autotune.study import ReferenceCache
from autotune.systems import SYSTEMS
from autotune.testing.records import made_up_metrics

from tests.test_cli import _read_only, env_error, invoke, ok, user_error

SLO = {"ttft_p99_ms": 500.0, "tpot_p99_ms": 50.0, "ttft_basis": "paper", "tpot_basis": "paper"}


def _row(number: int, outcome: str, peft: float, knob: float = 1.0, state: str = "COMPLETE") -> TrialRow:
    metrics = made_up_metrics(peft, 400.0 + number, 40.0 + number)
    return TrialRow(number=number, state=state, outcome=outcome, params={"knob": knob}, metrics=metrics,
                    constraints={})


def _result(system: str, rate: float, *rows: TrialRow, ceiling: float = 1.25) -> StudyResult:
    return StudyResult(
        study_name=f"{system}-fig8a-{rate:g}rps-sim",
        config={"system": system, "figure": "fig8a", "rate_req_s": rate,
                "backend": {"backend": "sim", "hardware": "2x-rtx3090"}},
        slo=SLO, references={"trainer_alone": {"metrics": made_up_metrics(ceiling).to_dict()}}, rows=rows,
    )


@pytest.fixture
def made_up() -> list[StudyResult]:
    """Rate 2: both feasible. Rate 4: only LLMStation (chunked: inf). Rate 6:
    neither (blank). FineInfer at 2: none feasible, with one interrupted trial
    that does not count."""
    return [
        _result("chunked", 2.0, _row(0, "feasible", 0.5, 128), _row(1, "infeasible", 0.9, 512)),
        _result("llmstation", 4.0, _row(0, "infeasible", 1.2), _row(1, "feasible", 0.8, 3.0)),
        _result("llmstation", 2.0, _row(0, "feasible", 1.0, 8.0), _row(1, "feasible", 0.75, 2.0)),
        _result("chunked", 4.0, _row(0, "infeasible", 0.9), _row(1, "crashed", 0.0)),
        _result("llmstation", 6.0, _row(0, "infeasible", 0.9)),
        _result("chunked", 6.0, _row(0, "infeasible", 0.7)),
        _result("fineinfer", 2.0, _row(0, "infeasible", 0.01), _row(1, "interrupted", 0.0, state="FAIL")),
    ]


def test_rows_from_made_up_studies(made_up):
    rows = figure_rows(made_up)
    at = {(r.system, r.rate_req_s): r for r in rows}
    assert [(r.system, r.rate_req_s) for r in rows] == [  # LLMStation first, then as the studies come; rates up
        ("llmstation", 2.0), ("llmstation", 4.0), ("llmstation", 6.0),
        ("chunked", 2.0), ("chunked", 4.0), ("chunked", 6.0), ("fineinfer", 2.0)]
    best = at["llmstation", 2.0]
    assert (best.best_knobs, best.peft_samples_per_s, best.ttft_p99_ms, best.tpot_p99_ms) == ({"knob": 8.0}, 1.0,
                                                                                              400.0, 40.0)
    assert (best.feasible_trials, best.trials, best.llmstation_ratio) == (2, 2, None)  # blank for itself
    assert at["llmstation", 4.0].peft_samples_per_s == 0.8  # the best *feasible*, not the highest
    assert at["chunked", 2.0].llmstation_ratio == pytest.approx(1.0 / 0.5)
    none = at["chunked", 4.0]
    assert (none.best_knobs, none.peft_samples_per_s, none.ttft_p99_ms, none.feasible_trials) == (None, 0.0, None, 0)
    assert math.isinf(none.llmstation_ratio)  # LLMStation meets the SLO there, chunked does not
    assert at["chunked", 6.0].llmstation_ratio is None  # both 0: blank
    fine = at["fineinfer", 2.0]
    assert (fine.trials, fine.peft_samples_per_s, fine.llmstation_ratio) == (1, 0.0, math.inf)
    assert [r.system for r in figure_rows(made_up, ["fineinfer", "chunked", "llmstation"])][:2] == ["fineinfer",
                                                                                                    "chunked"]


def test_rows_without_llmstation_leave_the_ratio_blank(made_up):
    rows = figure_rows([r for r in made_up if r.config["system"] != "llmstation"])
    assert all(r.llmstation_ratio is None for r in rows)


def test_csv_columns_and_cells(made_up):
    rows = list(csv.DictReader(io.StringIO(csv_text(figure_rows(made_up)))))
    assert list(rows[0]) == list(CSV_COLUMNS) == ["system", "rate_req_s", "best_knobs", "peft_samples_per_s",
                                                  "ttft_p99_ms", "tpot_p99_ms", "feasible_trials", "trials",
                                                  "llmstation_ratio"]
    at = {(r["system"], r["rate_req_s"]): r for r in rows}
    assert json.loads(at["llmstation", "2"]["best_knobs"]) == {"knob": 8.0}
    assert (at["llmstation", "2"]["peft_samples_per_s"], at["llmstation", "2"]["llmstation_ratio"]) == ("1", "")
    assert at["chunked", "2"]["llmstation_ratio"] == "2"
    assert at["chunked", "4"] == {"system": "chunked", "rate_req_s": "4", "best_knobs": "", "peft_samples_per_s": "0",
                                  "ttft_p99_ms": "", "tpot_p99_ms": "", "feasible_trials": "0", "trials": "2",
                                  "llmstation_ratio": "inf"}
    assert at["chunked", "6"]["llmstation_ratio"] == ""


def test_figure_data_caption_and_comparison(made_up):
    data = figure_data("fig8a", made_up)
    assert (data.hardware, data.backend, data.trainer_alone_samples_per_s) == ("2x-rtx3090", "sim", 1.25)
    assert data.slo_text == "P99 TTFT <= 500 ms, P99 TPOT <= 50 ms"
    text = comparison_text(data)
    line = next(ln for ln in text.splitlines() if ln.startswith("4 "))
    assert line.split() == ["4", "0.800", "0.000", "(inf)", "-"]
    assert "0.500 (2x)" in text


def test_default_rates_and_parsing():
    assert default_rates(7.0) == (1.8, 3.5, 5.2, 7.0)
    assert default_rates(3.0) == (0.75, 1.5, 2.2, 3.0)
    assert default_rates(24.0) == (6.0, 12.0, 18.0, 24.0)
    assert parse_rates("7, 1,3,3") == (1.0, 3.0, 7.0)
    assert parse_systems("all")[0] == "llmstation" and sorted(parse_systems("all")) == sorted(SYSTEMS)
    assert parse_systems("chunked,llmstation,chunked") == ("chunked", "llmstation")


def test_live_view_rows():
    done = FigureRow("llmstation", 7.0, {"k": 1}, 0.684, 465.5, 47.95, 2, 20, 1.27)
    none = FigureRow("chunked", 7.0, None, 0.0, None, None, 0, 4, 1.27)
    console = Console(record=True, width=140, color_system=None)
    console.print(progress_table("fig8a", [ProgressEntry("llmstation", 7.0, 20, "done", done),
                                           ProgressEntry("chunked", 7.0, 20, "running", none),
                                           ProgressEntry("fineinfer", 7.0, 20, "waiting", None)]))
    lines = console.export_text().splitlines()
    assert "fig8a: 1 of 3 studies done" in lines[0]
    cells = lambda system: next(ln for ln in lines if system in ln).replace("│", " ").split()  # noqa: E731
    assert cells("llmstation") == ["llmstation", "7", "20/20", "0.684", "465.5", "47.95", "2", "done"]
    assert cells("chunked") == ["chunked", "7", "4/20", "none", "-", "-", "0", "running"]
    assert cells("fineinfer") == ["fineinfer", "7", "0/20", "-", "-", "-", "-", "waiting"]


def _put_many(path: str, worker: int) -> None:
    cache = ReferenceCache(Path(path))
    for i in range(15):
        cache.put(f"w{worker}-{i}", {"metrics": {"i": i}})


def test_the_reference_cache_keeps_every_record_from_processes_side_by_side(tmp_path):
    path = tmp_path / "references.json"
    procs = [multiprocessing.get_context("fork").Process(target=_put_many, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len(json.loads(path.read_text())) == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["references.json"]  # no temporary or lock file left


# ---------------------------------------------------------------- end to end

SMALL = ["figure", "fig8a", "--systems", "llmstation,chunked", "--rates", "3,7", "--trials", 3,
         "--num-prompts", 30, "--plain"]


def _trial_counts(out: Path) -> dict[str, int]:
    counts = {}
    for db in sorted((out / "studies").glob("*.db")):
        (name,) = optuna.get_all_study_names(f"sqlite:///{db}")
        counts[name] = len(optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials)
    return counts


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small figure, once with one worker (in this process) and once with two (worker processes)."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    first = ok(invoke(*SMALL, "--out", one, "--workers", 1))
    ok(invoke(*SMALL, "--out", two, "--workers", 2))
    return one, two, first


def test_a_small_figure_end_to_end(small):
    out, _, result = small
    names = {f"{s}-fig8a-{r}rps-sim" for s in ("llmstation", "chunked") for r in (3, 7)}
    rows = list(csv.DictReader((out / "fig8a.csv").open()))
    assert [(r["system"], r["rate_req_s"]) for r in rows] == [("llmstation", "3"), ("llmstation", "7"),
                                                             ("chunked", "3"), ("chunked", "7")]
    assert all(r["trials"] == "3" for r in rows)
    for r in rows:
        assert float(r["peft_samples_per_s"]) >= 0
        assert (r["best_knobs"] == "") == (r["feasible_trials"] == "0")
    assert {p.stem for p in (out / "json").glob("*.json")} == names
    doc = json.loads((out / "json" / "chunked-fig8a-7rps-sim.json").read_text())
    assert (doc["system"], doc["rate_req_s"], len(doc["trials"])) == ("chunked", 7, 3)
    assert {p.stem for p in (out / "logs").glob("*.log")} == names
    assert _trial_counts(out) == dict.fromkeys(names, 3)
    png = (out / "fig8a.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    svg = (out / "fig8a.svg").read_text()
    assert "<svg" in svg and "LLMStation" in svg and SYSTEMS["chunked"].title in svg
    assert "Figure 8a" in svg and "request rate (req/s)" in svg and "trainer alone" in svg
    text = result.stdout
    assert "3, 7 req/s: --rates" in text
    assert "in brackets llmstation's / this system's" in text and "trainer alone (the ceiling)" in text
    assert sum(ln.startswith(("llmstation at", "chunked at")) for ln in text.splitlines()) == 4  # a line per study
    assert f"figure: {out / 'fig8a.png'}" in text


def test_two_workers_write_the_same_csv_as_one(small):
    one, two, _ = small
    assert (two / "fig8a.csv").read_text() == (one / "fig8a.csv").read_text()
    assert (two / "fig8a.svg").read_bytes() == (one / "fig8a.svg").read_bytes()


def test_running_it_again_adds_no_trial(small):
    _, out, _ = small
    before, csv_before = _trial_counts(out), (out / "fig8a.csv").read_text()
    ok(invoke(*SMALL, "--out", out, "--workers", 2))
    assert _trial_counts(out) == before
    assert (out / "fig8a.csv").read_text() == csv_before
    assert "3 trials stored, 0 to run for 3" in (out / "logs" / "chunked-fig8a-7rps-sim.log").read_text()


def test_more_trials_runs_only_the_missing_ones(tmp_path):
    args = ["figure", "fig9a", "--systems", "chunked", "--rates", "2", "--num-prompts", 20, "--out", tmp_path]
    ok(invoke(*args, "--trials", 1))
    ok(invoke(*args, "--trials", 3))
    assert _trial_counts(tmp_path) == {"chunked-fig9a-2rps-sim": 3}
    assert "1 trials stored, 2 to run for 3" in (tmp_path / "logs" / "chunked-fig9a-2rps-sim.log").read_text()


def test_show_loads_a_figure_study_by_its_file(small):
    out, _, _ = small
    result = ok(invoke("show", out / "studies" / "llmstation-fig8a-3rps-sim.db"))
    assert "study llmstation-fig8a-3rps-sim: 3 trials" in result.stdout
    loaded = load_study_file(out / "studies" / "llmstation-fig8a-3rps-sim.db")
    assert (loaded.study_name, len(loaded.rows)) == ("llmstation-fig8a-3rps-sim", 3)
    with pytest.raises(UserError, match="no study database"):
        load_study_file(out / "studies" / "nope.db")


def test_without_matplotlib_the_csv_and_json_are_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    result = ok(invoke("figure", "fig8a", "--systems", "chunked", "--rates", "7", "--trials", 1,
                       "--num-prompts", 20, "--out", tmp_path))
    assert (tmp_path / "fig8a.csv").is_file() and (tmp_path / "json" / "chunked-fig8a-7rps-sim.json").is_file()
    assert not (tmp_path / "fig8a.png").exists() and not (tmp_path / "fig8a.svg").exists()
    hint = [ln for ln in result.stdout.splitlines() if "need matplotlib" in ln]
    assert hint == ['no figure drawn: fig8a.png and .svg need matplotlib: pip install -e ".[figure]"']


def test_slo_options_reach_every_study(tmp_path):
    result = ok(invoke("figure", "fig8a", "--systems", "chunked", "--rates", "3,7", "--trials", 1,
                       "--num-prompts", 20, "--out", tmp_path, "--slo-ttft-ms", 400, "--slo-tpot-ratio", 1.5))
    slos = [json.loads(p.read_text())["slo"] for p in sorted((tmp_path / "json").glob("*.json"))]
    assert [s["ttft_p99_ms"] for s in slos] == [400.0, 400.0]
    assert all(s["tpot_basis"].startswith("1.5x serving-alone P99") for s in slos)
    assert "SLO P99 TTFT <= 400 ms, P99 TPOT <= 1.5x serving-alone P99" in result.stdout  # ms differ per rate


def test_one_sqlite_storage_for_every_study_runs_them_one_after_another(tmp_path):
    db = tmp_path / "all.db"
    result = ok(invoke("figure", "fig8a", "--systems", "chunked", "--rates", "3,7", "--trials", 1,
                       "--num-prompts", 20, "--out", tmp_path / "out", "--storage", f"sqlite:///{db}",
                       "--workers", 2, "--plain"))
    assert "one after another" in result.stdout and "1 worker;" in result.stdout
    assert sorted(optuna.get_all_study_names(f"sqlite:///{db}")) == ["chunked-fig8a-3rps-sim",
                                                                     "chunked-fig8a-7rps-sim"]
    assert not (tmp_path / "out" / "studies").exists()


def test_a_study_a_worker_refuses_stops_the_run_in_one_line(tmp_path):
    """Resumed with another workload (--num-prompts): each worker's study
    refuses, the first refusal is the one line, exit 2, nothing written."""
    args = ["figure", "fig8a", "--systems", "chunked", "--rates", "3,7", "--trials", 1, "--out", tmp_path,
            "--workers", 2]
    ok(invoke(*args, "--num-prompts", 20))
    before = _trial_counts(tmp_path)
    (tmp_path / "fig8a.csv").unlink()
    user_error(invoke(*args, "--num-prompts", 25), "exists with other settings", "workload_digest")
    assert _trial_counts(tmp_path) == before and not (tmp_path / "fig8a.csv").exists()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, words", [
    (["fig99"], ["unknown figure 'fig99'", "fig8a, fig9a, fig10, fig12, fig13"]),
    (["fig10", "--rates", "0.5,1"], ["--rates", "fig10 is drawn at one request rate", "0.5, 1"]),
    (["fig12", "--rates", "1"], ["--rates", "fig12 serves nothing"]),
    (["fig12", "--trials", "3"], ["--trials", "one trial per --tasklets"]),
    (["fig12", "--systems", "chunked"], ["fig12 is for llmstation only", "chunked"]),
    (["fig12", "--objective", "pareto"], ["--objective pareto", "fig12 serves nothing"]),
    (["fig12", "--tasklets", "0,4"], ["--tasklets", "1..1024", "got 0"]),
    (["fig12", "--tasklets", "a"], ["--tasklets", "whole numbers"]),
    (["fig13", "--lora-dists", "uniform,wide"], ["--lora-dists", "uniform, skewed, none", "'wide'"]),
    (["fig13", "--lora-ranks", "8,12"], ["--lora-ranks", "8, 16, 32", "got 12"]),
    (["fig8a", "--lora-dists", "uniform"], ["--lora-dists applies to fig13, not fig8a"]),
    (["fig10", "--lora-ranks", "8"], ["--lora-ranks applies to fig13, not fig10"]),
    (["fig13", "--tasklets", "4"], ["--tasklets applies to fig12, not fig13"]),
    (["fig8a", "--rates", "1,x"], ["--rates", "'1,x'"]),
    (["fig8a", "--rates", "3,0"], ["--rates", "positive", "got 0"]),
    (["fig8a", "--rates", ","], ["--rates"]),
    (["fig8a", "--systems", "llmstation,nope"], ["--systems", "'nope'", "chunked"]),
    (["fig8a", "--systems", ""], ["--systems"]),
    (["fig8a", "--workers", "0"], ["--workers", "got 0"]),
    (["fig8a", "--hardware", "nope"], ["nope"]),
    (["fig8a", "--backend", "gpu", "--hardware", "h200"], ["--hardware", "--backend sim"]),
])
def test_bad_input_is_exit_2_and_one_line(tmp_path, args, words):
    out = tmp_path / "out"
    user_error(invoke("figure", *args, "--out", out), *words)
    assert not out.exists()


def test_an_out_that_is_a_file_is_exit_2(tmp_path):
    (tmp_path / "notes").write_text("mine\n")
    user_error(invoke("figure", "fig8a", "--out", tmp_path / "notes"), "--out", "is a file")
    user_error(invoke("figure", "fig8a", "--out", tmp_path / "notes" / "sub"), "--out", "is a file")
    assert (tmp_path / "notes").read_text() == "mine\n"


def test_an_unwritable_out_is_exit_1(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    env_error(invoke("figure", "fig8a", "--out", ro / "figs"), "--out", f"folder {ro} is not writable")
    ro.chmod(0o755)
    assert list(ro.iterdir()) == []


# ---------------------------------------------------------------- Ctrl-C


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (Linux)."""
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_stops_the_studies_and_is_exit_130(tmp_path, workers):
    """With 2 workers each is asked to stop and ends; with 1 the study runs
    in the command's own process. Either way the trials in flight are
    recorded as interrupted, nothing is left running, and the same command
    resumes."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "autotune", "figure", "fig8a", "--systems", "llmstation,chunked", "--rates", "7",
           "--trials", 200, "--workers", workers, "--out", out, "--plain"]
    proc = subprocess.Popen([str(a) for a in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # every worker in a trial
        logs = list((out / "logs").glob("*.log")) if (out / "logs").is_dir() else []
        if sum("trial 1:" in p.read_text() for p in logs) == workers:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the studies did not start trials")
    children = _children(proc.pid)
    assert len(children) >= (workers if workers > 1 else 0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autotune: interrupted; ") and "resume" in lines[0], lines
    deadline = time.monotonic() + 10  # Python's resource tracker ends once it sees the command gone
    while [pid for pid in children if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if _alive(pid)]  # nothing left running
    interrupted = 0
    for db in (out / "studies").glob("*.db"):
        (name,) = optuna.get_all_study_names(f"sqlite:///{db}")
        trials = optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials
        assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        stopped = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        assert [t.user_attrs.get("outcome") for t in stopped] in ([], ["interrupted"])
        interrupted += len(stopped)
    assert interrupted == workers  # the trials in flight
    assert not list((out / "logs").glob(".stop-*"))
    assert not (out / "fig8a.csv").exists()


def test_ctrl_c_in_the_tune_command_is_exit_130_too(tmp_path, monkeypatch):
    """Typer turns a KeyboardInterrupt into a bare exit code; the CLI keeps its one line and 130."""
    import autotune.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(autotune.cli, "run_study", interrupted)
    result = invoke("chunked", "--trials", 1, "--num-prompts", 20, "--runs-dir", tmp_path)
    assert result.exit_code == 130
    assert result.stderr.strip() == "autotune: interrupted; the study keeps every finished trial"
