"""``autotune figure`` fig10, fig12 and fig13 end to end on the simulator, at
a small size: the studies they make, the CSV, the JSON, the PNG and SVG, the
text, and a second run that adds no trial."""

from __future__ import annotations

import csv
import json
import shutil

from autotune.results import load_study_file

from tests.figure.test_run import _trial_counts
from tests.test_cli import invoke, ok


def test_fig10_makes_pareto_studies_and_draws_every_trial(fig10_small):
    out, text = fig10_small
    names = {"llmstation-fig10-0.88rps-pareto-sim", "chunked-fig10-0.88rps-pareto-sim"}
    assert _trial_counts(out) == dict.fromkeys(names, 4)
    rows = list(csv.DictReader((out / "fig10.csv").open()))
    assert list(rows[0]) == ["system", "rate_req_s", "trial", "knobs", "peft_samples_per_s", "ttft_p99_ms",
                             "tpot_p99_ms", "outcome", "pareto_optimal", "on_ttft_curve", "on_tpot_curve"]
    assert len(rows) == 8 and {r["rate_req_s"] for r in rows} == {"0.88"}
    for name in names:
        doc = json.loads((out / "json" / f"{name}.json").read_text())
        system = doc["system"]
        assert doc["objective"] == "pareto"
        flagged = {int(r["trial"]) for r in rows if r["system"] == system and r["pareto_optimal"] == "1"}
        assert flagged == {t["number"] for t in doc["pareto_optimal"]}
        mine = [r for r in rows if r["system"] == system]
        fastest = max(mine, key=lambda r: float(r["peft_samples_per_s"]))
        assert fastest["on_ttft_curve"] == fastest["on_tpot_curve"] == "1"  # nothing beats the fastest on PEFT
    svg = (out / "fig10.svg").read_text()
    assert "Figure 10" in svg and "P99 TTFT (ms)" in svg and "P99 TPOT (ms)" in svg and "SLO 500 ms" in svg
    assert "PEFT throughput (samples/s)" in svg and "LLMStation" in svg
    assert (out / "fig10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "trade-off curves" in text and "Pareto-optimal feasible trials" in text


def test_fig10_resumed_adds_no_trial(fig10_small, tmp_path):
    out, text = fig10_small
    copy = shutil.copytree(out, tmp_path / "again")
    ok(invoke("figure", "fig10", "--systems", "llmstation,chunked", "--trials", 4, "--num-prompts", 15,
              "--out", copy, "--workers", 1))
    assert _trial_counts(copy) == _trial_counts(out)
    assert (copy / "fig10.csv").read_text() == (out / "fig10.csv").read_text()
    assert "(0.88 req/s: fig10's preset for 2x-rtx3090), 4 trials each (objective pareto)" in text.splitlines()[0]


def test_fig12_sweeps_the_pause_points_in_one_study(tmp_path):
    result = ok(invoke("figure", "fig12", "--tasklets", "33,1,8", "--out", tmp_path))
    assert _trial_counts(tmp_path) == {"llmstation-fig12-sim": 3}
    rows = list(csv.DictReader((tmp_path / "fig12.csv").open()))
    assert [(r["forward_tasklets"], r["forward_pause_points"], r["backward_pause_points"],
             r["pause_points_per_step"]) for r in rows] == [("1", "33", "32", "65"), ("8", "5", "4", "9"),
                                                             ("33", "1", "1", "2")]
    peft = [float(r["peft_samples_per_s"]) for r in rows]
    ceiling = float(rows[0]["trainer_alone_samples_per_s"])
    assert peft[0] < peft[1] < peft[2] <= ceiling  # every pause point costs a little
    svg = (tmp_path / "fig12.svg").read_text()
    assert "Figure 12" in svg and "pause points per training step" in svg and "trainer alone" in svg
    assert "33+32" in svg
    assert "65 (33+32)" in result.stdout
    ok(invoke("figure", "fig12", "--tasklets", "1,8,33,4", "--out", tmp_path))  # one more setting: one more trial
    assert _trial_counts(tmp_path) == {"llmstation-fig12-sim": 4}


def test_fig13_has_a_study_per_system_and_lora_setting(tmp_path):
    result = ok(invoke("figure", "fig13", "--systems", "llmstation,chunked", "--lora-dists", "none,skewed",
                       "--lora-ranks", "16,8", "--trials", 1, "--num-prompts", 8, "--out", tmp_path, "--workers", 1))
    variants = ("skewed-r8", "skewed-r16", "none-r8")
    names = {f"{s}-fig13-0.88rps-lora-{v}-sim" for s in ("llmstation", "chunked") for v in variants}
    assert _trial_counts(tmp_path) == dict.fromkeys(names, 1)
    rows = list(csv.DictReader((tmp_path / "fig13.csv").open()))
    assert [(r["system"], r["lora_dist"], r["lora_rank"]) for r in rows] == [
        ("llmstation", "skewed", "8"), ("llmstation", "skewed", "16"), ("llmstation", "none", ""),
        ("chunked", "skewed", "8"), ("chunked", "skewed", "16"), ("chunked", "none", "")]
    loaded = load_study_file(tmp_path / "studies" / "chunked-fig13-0.88rps-lora-skewed-r16-sim.db")
    assert "adapters skewed" in loaded.config["workload"] and loaded.config["lora_rank"] == 16
    svg = (tmp_path / "fig13.svg").read_text()
    assert "Figure 13" in svg and "rank 16" in svg and "base model" in svg and "samples/s" in svg
    assert "0.88 skewed r16" in result.stdout
