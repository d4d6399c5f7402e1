"""The rows and points of fig10, fig12 and fig13, computed from made-up
studies: fig13's groups and LLMStation's ratio per group, fig10's curves
and Pareto flags, fig12's pause points; the live view's LoRA column."""

from __future__ import annotations

import math

from rich.console import Console

from autotune.figure.rows import (figure_data, figure_rows, lora_variants, pauses_text, tasklet_settings,
                                  trial_points)
from autotune.figure.run import ProgressEntry, progress_table
from autotune.results import StudyResult, TrialRow
from autotune.testing.records import made_up_metrics

SLO = {"ttft_p99_ms": 500.0, "tpot_p99_ms": 50.0, "ttft_basis": "paper", "tpot_basis": "paper"}


def _row(number: int, outcome: str, peft: float, ttft: float = 400.0, tpot: float = 40.0,
         params: dict | None = None) -> TrialRow:
    return TrialRow(number, "COMPLETE", outcome, params or {"knob": float(number)}, made_up_metrics(peft, ttft, tpot),
                    {})


def _result(system: str, *rows: TrialRow, figure: str = "fig13", lora: tuple[str, int] | None = None,
            pareto: tuple[int, ...] = (), rate: float = 0.88) -> StudyResult:
    config = {"system": system, "figure": figure, "rate_req_s": rate, "model": "llama-3.1-8b",
              "backend": {"backend": "sim", "hardware": "2x-rtx3090"}}
    if lora is not None:
        config.update(lora_dist=lora[0], lora_rank=lora[1])
    return StudyResult(f"{system}-{figure}", config, SLO if rate else None,
                       {"trainer_alone": {"metrics": made_up_metrics(1.25).to_dict()}}, rows,
                       objective="pareto" if pareto else "peft", pareto_numbers=pareto)


def test_lora_variants_keep_none_once():
    assert lora_variants() == [("uniform", 8), ("uniform", 16), ("uniform", 32), ("skewed", 8), ("skewed", 16),
                               ("skewed", 32), ("none", 8)]
    assert lora_variants(("none", "skewed"), (32,)) == [("skewed", 32), ("none", 8)]


def test_fig13_rows_are_compared_per_lora_setting():
    results = [_result("chunked", _row(0, "feasible", 0.5), lora=("skewed", 16)),
               _result("llmstation", _row(0, "feasible", 1.0), lora=("skewed", 16)),
               _result("llmstation", _row(0, "feasible", 0.6), lora=("uniform", 8)),
               _result("chunked", _row(0, "infeasible", 0.9), lora=("uniform", 8))]
    data = figure_data("fig13", results)
    assert data.groups == [(0.88, "uniform r8"), (0.88, "skewed r16")]  # the paper's order, not the studies'
    at = {(r.system, r.group[1]): r for r in figure_rows(results)}
    assert at["chunked", "skewed r16"].llmstation_ratio == 2.0  # LLMStation's at the same setting, not another
    assert math.isinf(at["chunked", "uniform r8"].llmstation_ratio)


def test_fig10_points_carry_the_curves_and_the_pareto_flags():
    rows = (_row(0, "feasible", 1.0, ttft=300, tpot=30), _row(1, "feasible", 0.5, ttft=200, tpot=35),
            _row(2, "infeasible", 1.2, ttft=600, tpot=32), _row(3, "feasible", 0.4, ttft=350, tpot=36),
            TrialRow(4, "COMPLETE", "crashed", {"knob": 4.0}, made_up_metrics(), {}))
    points = {p.number: p for p in trial_points(_result("llmstation", *rows, figure="fig10", pareto=(0, 1)))}
    assert sorted(points) == [0, 1, 2, 3]  # the crash has nothing to draw
    assert [n for n, p in sorted(points.items()) if p.on_ttft_curve] == [0, 1, 2]  # 3 is beaten by 1
    assert [n for n, p in sorted(points.items()) if p.on_tpot_curve] == [0, 2]  # 1 and 3 beaten by 0
    assert [n for n, p in sorted(points.items()) if p.pareto_optimal] == [0, 1]  # as the study says
    assert points[2].outcome == "infeasible" and points[0].pause_points is None  # no tasklet knobs


def test_fig12_points_count_the_pause_points_and_the_text_gives_the_share():
    settings = tasklet_settings((1, 33))
    assert settings[0]["forward_tasklets"] == settings[0]["backward_tasklets"] == 1
    assert settings[1]["forward_wait_s"] == 0.005  # the default; nothing is served, so it never applies
    rows = (TrialRow(0, "COMPLETE", "feasible", settings[0], made_up_metrics(1.0), {}),
            TrialRow(1, "COMPLETE", "feasible", settings[1], made_up_metrics(1.2), {}))
    data = figure_data("fig12", [_result("llmstation", *rows, figure="fig12", rate=0.0)])
    assert [(p.pause_points, p.pause_points_per_step) for p in data.points] == [((33, 32), 65), ((1, 1), 2)]
    lines = pauses_text(data).splitlines()
    assert lines[2].split()[:4] == ["1", "65", "(33+32)", "1.000"] and lines[2].endswith("80.0%")
    assert lines[-1] == "trainer alone, no pause point: 1.250 samples/s"


def test_live_view_shows_the_lora_setting_and_no_rate_without_serving():
    console = Console(record=True, width=160, color_system=None)
    console.print(progress_table("fig13", [ProgressEntry("chunked", 0.88, 4, "waiting", None, "skewed r16")]))
    text = console.export_text()
    assert "LoRA adapters" in text and "skewed r16" in text
    console = Console(record=True, width=160, color_system=None)
    console.print(progress_table("fig12", [ProgressEntry("llmstation", 0.0, 6, "running", None)]))
    line = next(ln for ln in console.export_text().splitlines() if "llmstation" in ln)
    assert line.replace("│", " ").split()[:3] == ["llmstation", "-", "0/6"] and "LoRA" not in console.export_text()


def test_a_pareto_study_row_counts_its_pareto_optimal_trials_in_the_live_view():
    pareto = _result("llmstation", _row(0, "feasible", 1.0), _row(1, "feasible", 0.5, ttft=100.0),
                     figure="fig10", pareto=(0, 1))
    row = figure_rows([pareto])[0]
    assert row.pareto_optimal == 2 and figure_rows([_result("chunked", _row(0, "feasible", 1.0))])[0].pareto_optimal is None
    console = Console(record=True, width=160, color_system=None)
    console.print(progress_table("fig10", [ProgressEntry("llmstation", 0.88, 4, "running", row)]))
    lines = console.export_text().splitlines()
    assert "Pareto-optimal" in "\n".join(lines)
    assert next(ln for ln in lines if "llmstation" in ln).replace("│", " ").split()[-2:] == ["2", "running"]
