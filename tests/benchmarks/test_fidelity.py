"""The fidelity benchmark: settings -> specs (as a study builds them), the
rows file, the GPU script's plan and loop (on a stand-in backend), the
comparison's arithmetic, and the scorer end to end on made-up GPU rows."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # ``benchmarks`` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from autotune.backends import make_backend  # noqa: E402
from autotune.errors import UserError  # noqa: E402
from autotune.figures import get_figure  # noqa: E402
from autotune.context import study_workload  # noqa: E402
from autotune.policy import SAMPLE_TOKENS, PausePlan  # noqa: E402
from autotune.study import (  # noqa: E402
    StudyConfig,
    _reference_spec,
    workload_digest,
    prepare,
    trial_spec,
)
from autotune.systems import get_system  # noqa: E402
from autotune.trial import TrialKind, TrialResult  # noqa: E402
from benchmarks.fidelity import compare, rows, score  # noqa: E402
from benchmarks.fidelity.rows import RowsFile, Setting, median_and_spread, plan, spec_for  # noqa: E402

H200_SETTINGS = REPO / "benchmarks" / "fidelity" / "h200-settings.json"
GPU_SCRIPT = REPO / "benchmarks" / "gpu" / "fidelity.py"
LLMSTATION_LOW = {"forward_tasklets": 1, "forward_wait_s": 0.02, "backward_tasklets": 1, "backward_wait_s": 0.02}
LLMSTATION_HIGH = {"forward_tasklets": 33, "forward_wait_s": 0.0, "backward_tasklets": 33, "backward_wait_s": 0.0}


def setting(system="vllm-torchtune", params=None, figure="fig8a", rate=4.0, **kw) -> Setting:
    params = params if params is not None else {"mps_active_thread_pct": 50}
    return Setting.from_dict({"system": system, "figure": figure, "rate_req_s": rate, "params": params, **kw})


def gpu_script():
    """benchmarks/gpu/fidelity.py as a module (it is a script, not a package member)."""
    spec = importlib.util.spec_from_file_location("fidelity_gpu_script", GPU_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- pure functions


def test_relative_error_and_na():
    assert compare.relative_error(110.0, 100.0) == pytest.approx(0.10)
    assert compare.relative_error(80.0, 100.0) == pytest.approx(-0.20)
    assert compare.relative_error(5.0, 0.0) is None  # GPU 0: n/a
    assert compare.relative_error(5.0, None) is None
    assert compare.relative_error(None, 3.0) is None
    assert compare.relative_error(float("nan"), 3.0) is None


def test_median_abs_error_leaves_out_na():
    assert compare.median_abs_error([0.1, -0.3, None, 0.2]) == pytest.approx(0.2)
    assert compare.median_abs_error([-0.1, 0.3]) == pytest.approx(0.2)  # even count: mean of the middle two
    assert compare.median_abs_error([None, None]) is None
    assert compare.median_abs_error([]) is None


def test_meets_slo():
    assert compare.meets_slo(90, 9, 100, 10) is True
    assert compare.meets_slo(100, 10, 100, 10) is True  # at the limit is within it
    assert compare.meets_slo(101, 9, 100, 10) is False
    assert compare.meets_slo(90, 11, 100, 10) is False
    assert compare.meets_slo(90, 9, 100, 10, failed=1) is False  # as the study: a failed request misses
    assert compare.meets_slo(None, 9, 100, 10) is None
    assert compare.meets_slo(90, 9, None, 10) is None


def test_verdict_agreement_counts_only_pairs_with_both():
    pairs = [(True, True), (True, False), (False, False), (None, True), (False, None)]
    assert compare.verdict_agreement(pairs) == (2, 3)
    assert compare.verdict_agreement([]) == (0, 0)


def test_summarize_targets():
    rows_ = [
        {"error": {"ttft_p99_ms": 0.10, "tpot_p99_ms": -0.05, "peft_samples_per_s": 0.30},
         "verdict": {"gpu": True, "sim": True}},
        {"error": {"ttft_p99_ms": -0.30, "tpot_p99_ms": 0.08, "peft_samples_per_s": None},
         "verdict": {"gpu": False, "sim": True}},
        {"error": {"ttft_p99_ms": 0.15, "tpot_p99_ms": None, "peft_samples_per_s": 0.02},
         "verdict": {"gpu": None, "sim": False}},
    ]
    s = compare.summarize(rows_)
    assert s["settings"] == 3
    assert s["median_abs_error"]["ttft_p99_ms"] == pytest.approx(0.15)
    assert s["median_abs_error"]["tpot_p99_ms"] == pytest.approx(0.065)
    assert s["median_abs_error"]["peft_samples_per_s"] == pytest.approx(0.16)
    assert s["errors_counted"] == {"ttft_p99_ms": 3, "tpot_p99_ms": 2, "peft_samples_per_s": 2}
    assert s["verdicts"] == {"agree": 1, "total": 2, "share": 0.5}
    t = s["targets"]
    assert t["ttft_p99_ms"]["met"] is True and t["ttft_p99_ms"]["target"] == 0.20
    assert t["tpot_p99_ms"]["met"] is True
    assert t["peft_samples_per_s"]["met"] is False
    assert t["verdict_agreement"]["met"] is False
    empty = compare.summarize([])
    assert empty["median_abs_error"]["ttft_p99_ms"] is None
    assert empty["targets"]["verdict_agreement"]["met"] is None


def _move_row(system, params, gpu, sim, spread=None, figure="fig8a", rate=24.0):
    names = ("ttft_p99_ms", "tpot_p99_ms", "peft_samples_per_s")
    return {"system": system, "figure": figure, "rate_req_s": rate, "params": params,
            "gpu": dict(zip(names, gpu)), "sim": dict(zip(names, sim)),
            "gpu_spread": dict(zip(names, spread)) if spread else {}}


def test_knob_moves_directions_and_signs():
    rows_ = [
        # given high first: the move must still go from the lowest to the highest value
        _move_row("vllm-torchtune", {"mps_active_thread_pct": 100}, (150, 12, 3.0), (130, 11, 2.5),
                  spread=([140, 160], [11.5, 12.5], [2.9, 3.1])),
        _move_row("vllm-torchtune", {"mps_active_thread_pct": 10}, (100, 10, 1.0), (140, 10, 1.0),
                  spread=([90, 110], [11.0, 12.0], [0.9, 1.1])),
        _move_row("llmstation", LLMSTATION_LOW, (50, 8, 1.0), (55, 9, None)),
        _move_row("llmstation", LLMSTATION_HIGH, (80, 9, 2.0), (60, 8, 2.2)),
        _move_row("chunked", {"chunk_size_tokens": 64}, (1, 1, 1), (1, 1, 1)),  # alone: no move
        _move_row("vllm-torchtune", {"mps_active_thread_pct": 10}, (1, 1, 1), (1, 1, 1), figure="fig9a"),
    ]
    order = {"llmstation": list(LLMSTATION_LOW), "vllm-torchtune": ["mps_active_thread_pct"]}
    moves = compare.knob_moves(rows_, order)
    assert [(m["system"], m["figure"]) for m in moves] == [("vllm-torchtune", "fig8a"), ("llmstation", "fig8a")]

    v = moves[0]
    assert (v["knob"], v["low"], v["high"], v["also_changed"]) == ("mps_active_thread_pct", 10, 100, [])
    ttft = v["metrics"]["ttft_p99_ms"]
    assert ttft["gpu_delta"] == pytest.approx(50) and ttft["sim_delta"] == pytest.approx(-10)
    assert ttft["gpu_change"] == pytest.approx(0.5) and ttft["sim_change"] == pytest.approx(130 / 140 - 1)
    assert ttft["agree"] is False and ttft["gpu_resolved"] is True
    tpot = v["metrics"]["tpot_p99_ms"]
    assert tpot["agree"] is True and tpot["gpu_resolved"] is False  # [11, 12] and [11.5, 12.5] overlap
    peft = v["metrics"]["peft_samples_per_s"]
    assert peft["agree"] is True and peft["gpu_change"] == pytest.approx(2.0)

    s = moves[1]
    assert s["knob"] == "forward_tasklets" and (s["low"], s["high"]) == (1, 33)
    assert s["also_changed"] == ["forward_wait_s", "backward_tasklets", "backward_wait_s"]
    assert s["metrics"]["ttft_p99_ms"]["agree"] is True
    assert s["metrics"]["tpot_p99_ms"]["agree"] is False  # GPU up, sim down
    assert s["metrics"]["peft_samples_per_s"]["agree"] is None  # a sim value missing: n/a
    assert s["metrics"]["ttft_p99_ms"]["gpu_resolved"] is None  # no spread given

    agreement = compare.knob_agreement(moves)
    assert agreement["ttft_p99_ms"] == {"agree": 1, "total": 2}
    assert agreement["peft_samples_per_s"] == {"agree": 1, "total": 1}


def test_signs():
    assert compare.signs_agree(0.0, 0.0) is True
    assert compare.signs_agree(0.0, 1.0) is False
    assert compare.signs_agree(-2.0, -0.1) is True
    assert compare.signs_agree(None, 1.0) is None


def test_median_and_spread():
    assert median_and_spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert median_and_spread([4.0, None, 1.0]) == (2.5, 1.0, 4.0)
    assert median_and_spread([]) == (None, None, None)
    assert median_and_spread([None]) == (None, None, None)


# ---------------------------------------------------------------- settings and specs


def test_setting_errors_are_one_line():
    with pytest.raises(UserError, match="unknown system"):
        setting(system="nope")
    with pytest.raises(UserError, match="missing: mps_active_thread_pct"):
        setting(params={})
    with pytest.raises(UserError, match="unknown: chunk_size_tokens"):
        setting(params={"mps_active_thread_pct": 50, "chunk_size_tokens": 64})
    with pytest.raises(UserError, match="unknown field"):
        setting(rate_rps=4)
    with pytest.raises(UserError, match="outside"):
        setting(params={"mps_active_thread_pct": 101})
    with pytest.raises(UserError, match="serves nothing"):
        setting(system="llmstation", params=LLMSTATION_LOW, figure="fig12")
    with pytest.raises(UserError, match="rate_req_s"):
        setting(rate=0)


def test_spec_for_gives_the_studys_workload_with_fresh_seeds_per_run():
    s = setting(system="fineinfer", params={"defer_s": 0.005}, rate=4.0, trial_seconds=20)
    config = StudyConfig(system="fineinfer", figure="fig8a", rate_req_s=4.0, trial_seconds=20)
    expected = study_workload(config, get_figure("fig8a"), get_system("fineinfer"), 4.0)
    specs = [spec_for(s, TrialKind.COLOCATED, run) for run in range(3)]
    for run, spec in enumerate(specs):
        assert spec.kind is TrialKind.COLOCATED
        assert spec.workload == expected  # fineinfer's 400 x rate prompts, cut to 20 s
        assert spec.policy == get_system("fineinfer").policy({"defer_s": 0.005})
        assert spec.number == run
        assert spec.label == f"fineinfer-fig8a-4rps-defer_s0.005-run{run}"
    assert len({sp.seed for sp in specs}) == 3
    assert len({sp.label for sp in specs}) == 3
    assert len(expected) < 400 * 4  # truncated
    other = setting(system="fineinfer", params={"defer_s": 0.005}, rate=4.0, trial_seconds=20, seed=3)
    assert spec_for(other, TrialKind.COLOCATED, 0).workload != expected  # the setting's seed draws the workload


def test_spec_for_matches_a_prepared_study(tmp_path):
    """COLOCATED is the study's trial; the references are the study's references."""
    s = setting(system="llmstation", params=LLMSTATION_LOW, rate=8.0, num_prompts=30)
    config = StudyConfig(system="llmstation", figure="fig8a", rate_req_s=8.0, num_prompts=30,
                         model="llama-3.1-8b", storage="sqlite:///:memory:", runs_dir=tmp_path)
    ctx = prepare(config, make_backend("sim"))
    assert spec_for(s, TrialKind.COLOCATED, 2) == replace(trial_spec(ctx, LLMSTATION_LOW, 2),
                                                         label=s.label(2))
    for kind in (TrialKind.SERVING_ALONE, TrialKind.TRAINER_ALONE):
        ours = spec_for(s, kind, 1)
        study = _reference_spec(ctx, kind)
        assert replace(ours, seed=study.seed, number=None, label=None) == study
        assert ours.seed == study.seed + 1 and ours.number == 1 and ours.label.endswith("-run1")
    alone = spec_for(s, TrialKind.TRAINER_ALONE, 0)
    assert alone.workload is None and alone.params == {}
    assert alone.policy.trainer_mps_active_thread_pct == 100
    assert (alone.policy.trainer_seq_len_tokens, alone.policy.pause_plan, alone.policy.arrival_gate) == (
        SAMPLE_TOKENS, PausePlan(), None)
    serving = spec_for(s, TrialKind.SERVING_ALONE, 0)
    assert serving.policy == get_system("llmstation").policy(get_system("llmstation").default_params())
    assert serving.workload == spec_for(s, TrialKind.COLOCATED, 0).workload


def test_h200_settings_plan_is_server_friendly():
    settings = rows.load_settings(H200_SETTINGS)
    assert len(settings) == 9 and all(s.trial_seconds == 15 and s.model == "llama-3.1-8b" for s in settings)
    steps = plan(settings, runs=2)
    assert sum(st.kind is TrialKind.COLOCATED for st in steps) == 18
    servers = [rows.server_key(st.setting) for st in steps]
    blocks = [k for i, k in enumerate(servers) if i == 0 or servers[i - 1] != k]
    assert len(blocks) == len(set(blocks)) == 3  # one block per server: three starts
    refs = [st for st in steps if st.kind is TrialKind.SERVING_ALONE]
    assert len(refs) == 4  # vllm-torchtune and chunked share fig8a at 24 req/s
    assert refs[0].systems == ("vllm-torchtune", "chunked")
    seen_refs = set()
    for st in steps:  # every run comes after its reference
        if st.kind is TrialKind.SERVING_ALONE:
            seen_refs.add(st.reference_key)
        else:
            assert st.reference_key in seen_refs
    with_trainer = plan(settings, runs=2, trainer_alone=True)
    alone = [st.setting.system for st in with_trainer if st.kind is TrialKind.TRAINER_ALONE]
    assert sorted(alone) == sorted({s.system for s in settings})
    with pytest.raises(UserError):
        plan(settings, runs=0)


# ---------------------------------------------------------------- the rows file


def _result(ttft: float, peft: float) -> TrialResult:
    """A made-up trial result with serving and PEFT figures."""
    from autotune.metrics import RequestRecord, TrainerIteration, peft_metrics, serving_metrics

    records = [RequestRecord(100, 3, i * 0.1, (i * 0.1 + ttft / 1000, i * 0.1 + ttft / 1000 + 0.01,
                                                i * 0.1 + ttft / 1000 + 0.02)) for i in range(5)]
    its = [TrainerIteration(i / peft, (i + 1) / peft, SAMPLE_TOKENS) for i in range(20)]
    return TrialResult(serving_metrics(records), peft_metrics(its, 0.0, 10.0), wall_s=1.0)


def test_rows_file_round_trips(tmp_path):
    settings = [setting(params={"mps_active_thread_pct": p}, num_prompts=10) for p in (10, 100)]
    rf = RowsFile.new(settings, "h200-140gb", "a GPU", "python benchmarks/gpu/fidelity.py")
    rf.add_run(settings[0], rows.run_record(0, _result(50.0, 2.0)))
    rf.add_run(settings[0], rows.run_record(1, TrialResult.crash("trainer died", wall_s=3.0)))
    path = tmp_path / "out.json"
    rf.save(path)
    back = RowsFile.load(path)
    assert back.to_dict() == json.loads(json.dumps(rf.to_dict()))
    row = back.rows[0]
    assert set(row) >= {"system", "figure", "rate_req_s", "params", "num_prompts", "trial_seconds", "runs"}
    ok, crashed = row["runs"]
    assert set(ok) == {"run", "ttft_p99_ms", "tpot_p99_ms", "peft_samples_per_s", "ttft_p50_ms", "tpot_p50_ms",
                       "completed", "failed", "error", "wall_s"}
    assert ok["ttft_p99_ms"] == pytest.approx(50.0) and ok["peft_samples_per_s"] == pytest.approx(2.0)
    assert crashed["error"] == "trainer died" and crashed["ttft_p99_ms"] is None
    assert back.rows[1]["runs"] == []
    assert back.has_run(settings[0], 1) and not back.has_run(settings[1], 0)
    assert [s.key for s in back.settings_list()] == [s.key for s in settings]


def test_rows_file_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    rf = RowsFile.new([setting()], "h200-140gb", "a GPU", "cmd")
    rf.save(path)
    before = path.read_text()

    def half_then_fail(data, f, **kw):
        f.write('{"hardware": "h2')
        raise OSError("disk full")

    monkeypatch.setattr(rows.json, "dump", half_then_fail)
    rf.add_run(setting(), {"run": 0})
    with pytest.raises(OSError):
        rf.save(path)
    assert path.read_text() == before  # the last whole file is still there
    assert RowsFile.load(path).rows[0]["runs"] == []


def test_rows_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        RowsFile.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        RowsFile.load(bad)
    bad.write_text(json.dumps({"hardware": "x", "settings": [], "references": [], "rows": [{"system": "x"}]}))
    with pytest.raises(UserError, match="no list of runs"):
        RowsFile.load(bad)


# ---------------------------------------------------------------- the GPU script


def _small_settings(tmp_path: Path) -> Path:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps([  # fineinfer between two settings of one server: the plan must reorder
        {"system": "chunked", "figure": "fig8a", "rate_req_s": 4, "params": {"chunk_size_tokens": 64},
         "num_prompts": 12},
        {"system": "fineinfer", "figure": "fig8a", "rate_req_s": 4, "params": {"defer_s": 0.005}, "num_prompts": 12},
        {"system": "vllm-torchtune", "figure": "fig8a", "rate_req_s": 4, "params": {"mps_active_thread_pct": 10},
         "num_prompts": 12},
    ]))
    return path


def test_dry_run_prints_the_plan(tmp_path):
    path = _small_settings(tmp_path)
    out = subprocess.run([sys.executable, str(GPU_SCRIPT), "--settings", str(path), "--runs", "2", "--dry-run"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("plan: 8 trials (6 runs, 2 references) on 2 server configuration(s)")
    step = re.compile(r"^\s*\d+\. (?:serving alone|trainer alone|run \d+)\s+([^\s:]+)")
    labels = [m.group(1) for m in map(step.match, lines) if m]
    # chunked and vllm-torchtune together (one server, one reference), run 0s first; then fineinfer
    assert labels == [
        "chunked-fig8a-4rps-serving-alone-run0",
        "chunked-fig8a-4rps-chunk_size_tokens64-run0", "vllm-torchtune-fig8a-4rps-mps_active_thread_pct10-run0",
        "chunked-fig8a-4rps-chunk_size_tokens64-run1", "vllm-torchtune-fig8a-4rps-mps_active_thread_pct10-run1",
        "fineinfer-fig8a-4rps-serving-alone-run0", "fineinfer-fig8a-4rps-defer_s0.005-run0",
        "fineinfer-fig8a-4rps-defer_s0.005-run1",
    ]
    assert "12 requests over" in out.stdout
    assert "MPS off" in out.stdout and "MPS on" in out.stdout


def test_gpu_script_bad_input_exits_2(tmp_path):
    missing = subprocess.run([sys.executable, str(GPU_SCRIPT), "--settings", str(tmp_path / "no.json"), "--dry-run"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"system": "vllm", "figure": "fig8a", "rate_req_s": 4, "params": {}}]))
    unknown = subprocess.run([sys.executable, str(GPU_SCRIPT), "--settings", str(bad), "--dry-run"],
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "unknown system 'vllm'" in unknown.stderr


class StandIn:
    """The simulator in the GPU backend's place: a slow trial, one crash, what was run."""

    name = "gpu"
    hardware = "stand-in-80gb"

    def __init__(self, crash_label: str | None = None, delay_s: float = 0.0) -> None:
        self.sim = make_backend("sim")
        self.crash_label = crash_label
        self.delay_s = delay_s
        self.labels: list[str] = []

    def describe(self):
        return {"gpu": "stand-in", "gpu_memory_mib": 81920, "gpus": 1, "vllm": "-", "torch": "-", "mps": True}

    def run_trial(self, spec, progress=None):
        self.labels.append(spec.label)
        time.sleep(self.delay_s)
        if spec.label == self.crash_label:
            return TrialResult.crash("CUDA out of memory", wall_s=1.0)
        return self.sim.run_trial(spec)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_gpu_loop_records_crashes_stops_on_time_and_resumes(tmp_path, monkeypatch, capsys):
    import autotune.backends

    script = gpu_script()
    settings = _small_settings(tmp_path)
    out = tmp_path / "rows.json"
    crash = "chunked-fig8a-4rps-chunk_size_tokens64-run1"
    first = StandIn(crash_label=crash, delay_s=0.05)
    monkeypatch.setattr(autotune.backends, "make_backend", lambda name, **kw: first)
    argv = ["--settings", str(settings), "--runs", "2", "--out", str(out)]
    assert script.main([*argv, "--max-minutes", "0.0005"]) == 0  # 30 ms: one trial, then stop
    assert len(first.labels) == 1
    assert "trials not started" in capsys.readouterr().out
    saved = RowsFile.load(out)
    assert saved.hardware == "stand-in-80gb" and len(saved.references) == 1
    assert all(r["runs"] == [] for r in saved.rows)

    assert script.main(argv) == 2  # exists: no silent overwrite
    assert "--resume" in capsys.readouterr().err

    second = StandIn(crash_label=crash)
    monkeypatch.setattr(autotune.backends, "make_backend", lambda name, **kw: second)
    assert script.main([*argv, "--resume"]) == 0
    assert len(second.labels) == 7 and not set(second.labels) & set(first.labels)
    printed = capsys.readouterr().out
    assert f"{crash}: crashed: CUDA out of memory" in printed
    saved = RowsFile.load(out)
    assert [len(r["runs"]) for r in saved.rows] == [2, 2, 2]
    crashed = [run for r in saved.rows for run in r["runs"] if run["error"]]
    assert len(crashed) == 1 and crashed[0]["error"] == "CUDA out of memory"  # recorded, not dropped
    ref = saved.references[0]
    assert ref["kind"] == "serving_alone" and ref["systems"] == ["chunked", "vllm-torchtune"]
    assert ref["ttft_p99_ms"] > 0 and ref["server"] == {"gpu_memory_utilization": 0.45, "mps": True}

    third = StandIn()
    monkeypatch.setattr(autotune.backends, "make_backend", lambda name, **kw: third)
    assert script.main([*argv, "--resume"]) == 0 and third.labels == []  # nothing left to run


def test_dry_run_imports_no_vllm(tmp_path):
    # In a fresh interpreter: in this one, other tests (tests/gpu) may have imported the GPU backend already.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('fidelity_gpu_script', {str(GPU_SCRIPT)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"rc = module.main(['--settings', {str(_small_settings(tmp_path))!r}, '--dry-run'])\n"
        "print('LOADED', rc, sorted(m for m in ('vllm', 'autotune.gpu.backend') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = [line for line in proc.stdout.splitlines() if line.startswith("LOADED ")]
    assert loaded == ["LOADED 0 []"], proc.stdout[-2000:]


# ---------------------------------------------------------------- the scorer


def fake_gpu_rows(path: Path) -> None:
    """Made-up GPU rows: 2 settings (one not held out), a crashed run, one reference."""
    settings = [setting(params={"mps_active_thread_pct": p}, num_prompts=20, held_out=(p == 100)) for p in (10, 100)]
    rf = RowsFile.new(settings, "fake-80gb", "made up", "by hand")
    digest = workload_digest(rows.study_context(settings[0]).workload)
    rf.references.append({"kind": "serving_alone", "key": rows.reference_key(settings[0]),
                          "systems": ["vllm-torchtune"], "system": "vllm-torchtune", "figure": "fig8a",
                          "rate_req_s": 4.0, "workload_digest": digest, "ttft_p99_ms": 40.0, "tpot_p99_ms": 8.0,
                          "ttft_p50_ms": 20.0, "tpot_p50_ms": 7.0, "completed": 20, "failed": 0, "error": None,
                          "wall_s": 30.0})

    def run(i, ttft, tpot, peft, error=None):
        return {"run": i, "ttft_p99_ms": ttft, "tpot_p99_ms": tpot, "peft_samples_per_s": peft,
                "ttft_p50_ms": ttft and ttft / 2, "tpot_p50_ms": tpot and tpot * 0.9, "completed": 20,
                "failed": 0, "error": error, "wall_s": 60.0}

    rf.add_run(settings[0], run(0, 45.0, 8.5, 0.6))
    rf.add_run(settings[0], run(1, 47.0, 8.6, 0.0))  # PEFT 0 in one run: the median is 0.3
    rf.add_run(settings[1], run(0, 60.0, 10.0, 3.0))
    rf.add_run(settings[1], run(1, None, None, None, error="trainer died"))
    rf.save(path)


def test_scorer_end_to_end(tmp_path):
    gpu = tmp_path / "gpu.json"
    fake_gpu_rows(gpu)
    out, md = tmp_path / "res" / "fake.json", tmp_path / "res" / "fake.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fidelity.score", "--gpu", str(gpu),
                           "--slo-ttft-ratio", "1.25", "--slo-tpot-ratio", "1.1", "--out", str(out), "--md", str(md)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result) >= {"hardware", "profile", "rows", "summary"}
    assert result["hardware"] == "fake-80gb"
    assert result["profile"] == make_backend("sim").describe()["profile"]  # the simulator's default
    low, high = result["rows"]
    assert set(low) >= {"system", "figure", "rate_req_s", "params", "held_out", "slo", "gpu", "sim"}
    assert (low["held_out"], high["held_out"]) == (False, True)
    assert low["slo"]["ttft_p99_ms"] == pytest.approx(50.0) and low["slo"]["tpot_p99_ms"] == pytest.approx(8.8)
    assert low["gpu"]["ttft_p99_ms"] == pytest.approx(46.0)
    assert low["gpu"]["spread"]["ttft_p99_ms"] == [45.0, 47.0]
    assert low["gpu"]["runs"] == 2 and high["gpu"]["runs"] == 1 and high["gpu"]["crashed_runs"] == 1
    assert high["gpu"]["ttft_p99_ms"] == pytest.approx(60.0)  # the crashed run is left out
    assert set(low["sim"]) >= {"ttft_p99_ms", "tpot_p99_ms", "peft_samples_per_s"}
    assert low["sim"]["ttft_p99_ms"] > 0 and low["sim"]["peft_samples_per_s"] > 0
    assert low["error"]["ttft_p99_ms"] == pytest.approx(low["sim"]["ttft_p99_ms"] / 46.0 - 1)
    assert low["verdict"]["gpu"] is True and high["verdict"]["gpu"] is False
    s = result["summary"]
    assert s["targets_on"] == "held_out" and s["held_out"]["settings"] == 1 and s["all"]["settings"] == 2
    assert set(s["held_out"]["targets"]) == {"ttft_p99_ms", "tpot_p99_ms", "peft_samples_per_s",
                                             "verdict_agreement"}
    assert result["knob_moves"][0]["knob"] == "mps_active_thread_pct"

    text = md.read_text()
    assert text.count("| vllm-torchtune | fig8a | 4 |") == 3  # two rows and one knob move
    assert "46.0 [45.0..47.0]" in text and "n/a" in text
    assert "left out of every median" in text
    assert "Knobs move the simulator as they move the GPU" in text
    assert "<= 20%" in text and ">= 90%" in text
    assert "1 rows" in text or "2 rows" in text


def test_scorer_na_and_held_out_all(tmp_path):
    gpu = tmp_path / "gpu.json"
    fake_gpu_rows(gpu)
    data = json.loads(gpu.read_text())
    data["rows"][0]["runs"] = [{**r, "peft_samples_per_s": 0.0} for r in data["rows"][0]["runs"]]
    data["references"] = []  # no reference: no relative SLO, so no verdicts
    gpu.write_text(json.dumps(data))
    out = tmp_path / "o.json"
    assert score.main(["--gpu", str(gpu), "--profile", "h100-80gb", "--held-out-all", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    low = result["rows"][0]
    assert low["held_out"] is True and result["summary"]["all"]["settings"] == 2
    assert low["error"]["peft_samples_per_s"] is None  # GPU 0: n/a
    assert result["summary"]["all"]["errors_counted"]["peft_samples_per_s"] == 1
    assert low["slo"]["ttft_p99_ms"] is None and low["verdict"] == {"gpu": None, "sim": None}
    assert result["summary"]["all"]["targets"]["verdict_agreement"]["met"] is None
    assert out.with_suffix(".md").exists()
    one_gpu = tmp_path / "g.json"
    assert score.main(["--gpu", str(gpu), "--profile", "h100-80gb", "--gpus", "1", "--out", str(one_gpu)]) == 0
    assert json.loads(one_gpu.read_text())["simulator"][0]["gpus"] == 1
    absolute = tmp_path / "a.json"
    assert score.main(["--gpu", str(gpu), "--slo-ttft-ms", "1000", "--slo-tpot-ms", "100", "--out",
                       str(absolute)]) == 0
    assert json.loads(absolute.read_text())["rows"][0]["verdict"]["gpu"] is True


def test_scorer_takes_several_sittings_each_with_its_profile(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    fake_gpu_rows(a)
    fake_gpu_rows(b)
    out = tmp_path / "both.json"
    assert score.main(["--gpu", str(a), "--profile", "h100-80gb", "--gpu", str(b), "--profile", "h200",
                       "--gpus", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["profile"] == ["h100-80gb", "h200"]
    assert [(r["gpu_file"], r["profile"]) for r in result["rows"]] == [
        ("a.json", "h100-80gb"), ("a.json", "h100-80gb"), ("b.json", "h200"), ("b.json", "h200")]
    assert [g["file"] for g in result["gpu_rows"]] == ["a.json", "b.json"]
    assert result["summary"]["all"]["settings"] == 4
    # the same rows on two profiles: the simulator differs, the GPU does not
    first, second = result["rows"][0], result["rows"][2]
    assert first["gpu"] == second["gpu"] and first["sim"] != second["sim"]
    assert len(result["knob_moves"]) == 2  # one per file: settings of different sittings are not compared
    assert "| a.json (`h100-80gb`) |" in out.with_suffix(".md").read_text()
    assert score.main(["--gpu", str(a), "--gpu", str(b), "--profile", "h200", "--profile", "h200",
                       "--profile", "h200", "--out", str(out)]) == 2
    assert "3 --profile" in capsys.readouterr().err


def test_scorer_bad_input_exits_2(tmp_path, capsys):
    assert score.main(["--gpu", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    gpu = tmp_path / "gpu.json"
    fake_gpu_rows(gpu)
    assert score.main(["--gpu", str(gpu), "--profile", "no-such-profile", "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "'no-such-profile'" in err and len(err.strip().splitlines()) == 1


def test_a_gpu_study_becomes_a_rows_file_scored_against_its_own_slo(tmp_path):
    """A committed H100 study (--json) with a --confirm run: one row per trial and per confirmation,
    the study's references, every other trial of a system held out, the SLO the study used."""
    from benchmarks.fidelity import studies

    src = Path(__file__).resolve().parents[2] / "benchmarks/results/gpu-h100/rerun-2026-11-25/chunked-confirm.json"
    study = json.loads(src.read_text())
    counts = {"chunked": 3}  # as if the chunked study's 3 trials came first

    def held_out_of(system: str) -> bool:
        counts[system] += 1
        return counts[system] % 2 == 0

    rows_file = studies.convert(study, str(src), held_out_of)
    assert [r["params"]["chunk_size_tokens"] for r in rows_file.rows] == [128, 288, 128]
    assert [d["held_out"] for d in rows_file.settings] == [True, False, True]
    assert rows_file.rows[2]["runs"][0]["tpot_p99_ms"] == pytest.approx(9.638, abs=1e-3)
    path = tmp_path / "rows.json"
    rows_file.save(path)
    args = score.parse_args(["--gpu", str(path), "--profile", "h100-80gb", "--slo-ttft-ratio", "1.25",
                             "--slo-tpot-ratio", "1.1"])
    result = score.score([(path, RowsFile.load(path), "h100-80gb")], args)
    assert all(r["slo"]["tpot_p99_ms"] == pytest.approx(study["slo"]["tpot_p99_ms"]) for r in result["rows"])
    assert [r["verdict"]["gpu"] for r in result["rows"]] == [True, False, False]  # as the study judged them
