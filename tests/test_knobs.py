"""Knobs and search spaces: range validation, grids, defaults, distributions."""

from __future__ import annotations

import math

import optuna
import pytest

from autotune.errors import UserError
from autotune.knobs import Knob, SearchSpace, apply_ranges, load_search_space
from autotune.systems import SYSTEMS, get_system

PCT = Knob("mps_active_thread_pct", "int", "%", default=80, min_allowed=1, max_allowed=100)
WAIT = Knob("forward_wait_s", "float", "s", default=0.005, min_allowed=0.0, max_allowed=10.0)
KNOBS = (PCT, WAIT)
GOOD = {"mps_active_thread_pct": {"low": 10, "high": 100, "step": 5},
        "forward_wait_s": {"low": 0.0, "high": 0.05}}


def _with(**tables) -> dict:
    return {**GOOD, **tables}


def test_good_document_sets_the_ranges():
    space = apply_ranges("sys", KNOBS, GOOD, "test.toml")
    assert space.names == ("mps_active_thread_pct", "forward_wait_s")
    pct, wait = space["mps_active_thread_pct"], space["forward_wait_s"]
    assert (pct.low, pct.high, pct.step, pct.log) == (10, 100, 5, False)
    assert (wait.low, wait.high, wait.step, wait.log) == (0.0, 0.05, None, False)
    assert space.source == "test.toml"


def test_an_int_knob_without_step_gets_step_one():
    space = apply_ranges("sys", KNOBS, _with(mps_active_thread_pct={"low": 10, "high": 20}), "t")
    assert space["mps_active_thread_pct"].step == 1


@pytest.mark.parametrize("doc, message", [
    ({**GOOD, "nosuch_knob": {"low": 1, "high": 2}}, r"t\.toml: unknown knob\(s\) nosuch_knob for sys; its knobs are "
                                                      r"mps_active_thread_pct, forward_wait_s"),
    ({"mps_active_thread_pct": GOOD["mps_active_thread_pct"]}, r"no range for knob 'forward_wait_s' of sys"),
    (_with(forward_wait_s=0.01), r"\[forward_wait_s\]: expected a table with low/high, got 0\.01"),
    (_with(forward_wait_s={"low": 0.0, "high": 0.05, "lo": 1}), r"unknown key\(s\) lo; use low, high, step, log"),
    (_with(forward_wait_s={"low": "0", "high": 0.05}), r"'low' must be a number, got '0'"),
    (_with(forward_wait_s={"low": True, "high": 0.05}), r"'low' must be a number, got True"),
    (_with(forward_wait_s={"low": 0.0, "high": math.inf}), r"'high' must be finite"),
    (_with(forward_wait_s={"low": 0.0}), r"\[forward_wait_s\]: needs both 'low' and 'high'"),
    (_with(forward_wait_s={"low": 0.001, "high": 0.05, "log": "yes"}), r"'log' must be true or false, got 'yes'"),
    (_with(forward_wait_s={"low": 0.05, "high": 0.01}), r"low 0\.05 is above high 0\.01"),
    (_with(mps_active_thread_pct={"low": 10, "high": 120}), r"range 10–120 leaves the physical limits 1–100 %"),
    (_with(forward_wait_s={"low": -0.01, "high": 0.05}), r"range -0\.01–0\.05 leaves the physical limits 0–10 s"),
    (_with(mps_active_thread_pct={"low": 10.5, "high": 100}), r"integer knob; low, high and step must be integers"),
    (_with(mps_active_thread_pct={"low": 10, "high": 100, "step": 2.5}), r"integer knob"),
    (_with(forward_wait_s={"low": 0.0, "high": 0.05, "step": 0.0}), r"step must be positive, got 0"),
    (_with(forward_wait_s={"low": 0.0, "high": 0.05, "log": True}), r"log-scale range must start above 0, got low 0"),
    (_with(forward_wait_s={"low": 0.001, "high": 0.05, "step": 0.001, "log": True}), r"log-scale range cannot have a step"),
    (_with(mps_active_thread_pct={"low": 10, "high": 100, "step": 7}), r"high - low \(90\) is not a multiple of step 7"),
    (_with(mps_active_thread_pct={"low": 10, "high": 100, "step": 20}), r"high - low \(90\) is not a multiple of step 20"),
])
def test_bad_ranges_are_one_line_errors_naming_the_problem(doc, message):
    with pytest.raises(UserError, match=message) as info:
        apply_ranges("sys", KNOBS, doc, "t.toml")
    assert "\n" not in str(info.value)


def test_load_search_space_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"cannot read search-space file .*nosuch\.toml"):
        load_search_space("sys", KNOBS, tmp_path / "nosuch.toml")


def test_load_search_space_malformed_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[forward_wait_s]\nlow = \n")
    with pytest.raises(UserError, match=r"malformed search-space file .*bad\.toml"):
        load_search_space("sys", KNOBS, path)


def test_load_search_space_users_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[mps_active_thread_pct]\nlow = 20\nhigh = 60\nstep = 10\n"
                    "[forward_wait_s]\nlow = 0.001\nhigh = 0.1\nlog = true\n")
    space = load_search_space("sys", KNOBS, path)
    assert space.source == str(path)
    assert space["mps_active_thread_pct"].grid() == [20, 30, 40, 50, 60]
    assert space["forward_wait_s"].log and space["forward_wait_s"].step is None


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_shipped_search_spaces_load(name):
    space = get_system(name).search_space()
    assert space.source == f"search_spaces/{name.replace('-', '_')}.toml"
    for k in space:
        assert k.min_allowed <= k.low < k.high <= k.max_allowed


def test_shipped_ranges_are_the_issues_starting_ranges():
    pct = get_system("vllm-torchtune").search_space()["mps_active_thread_pct"]
    assert (pct.low, pct.high, pct.step) == (10, 100, 5)
    defer = get_system("fineinfer").search_space()["defer_s"]
    assert (defer.low, defer.high, defer.log) == (0.001, 1.0, True)
    chunk = get_system("chunked").search_space()["chunk_size_tokens"]
    assert (chunk.low, chunk.high) == (32, 512)
    llm = get_system("llmstation").search_space()
    assert (llm["forward_tasklets"].low, llm["forward_tasklets"].high) == (1, 33)
    assert (llm["backward_wait_s"].low, llm["backward_wait_s"].high) == (0.0, 0.05)


# ---------------------------------------------------------------- grids


def _knob(type_, low, high, step=None, log=False) -> Knob:
    return Knob("k", type_, "u", default=low, min_allowed=0, max_allowed=1e6).with_range(low, high, step, log)


def test_int_step_grid_is_every_step():
    assert _knob("int", 32, 512, step=32).grid() == list(range(32, 513, 32))
    assert _knob("int", 1, 33, step=1).grid() == list(range(1, 34))


def test_float_grid_without_step_is_linear_with_endpoints():
    pts = _knob("float", 0.0, 0.05).grid(max_points=6)
    assert pts == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04, 0.05])


def test_log_grid_is_geometric():
    pts = _knob("float", 0.001, 1.0, log=True).grid(max_points=4)
    assert pts == pytest.approx([0.001, 0.01, 0.1, 1.0])


def test_wide_int_grid_is_spread_and_snapped_to_integers():
    pts = _knob("int", 1, 1025, step=1).grid(max_points=5)  # 1025 steps > max_steps
    assert pts == [1, 257, 513, 769, 1025]
    assert all(isinstance(p, int) for p in pts)


def test_wide_int_log_grid_is_snapped_and_deduplicated():
    pts = _knob("int", 1, 1024, step=1, log=True).grid(max_points=11)
    assert pts == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def test_wide_float_step_grid_is_snapped_to_the_step():
    pts = _knob("float", 0.0, 1.0, step=0.01).grid(max_points=9)  # 101 steps > max_steps
    assert pts[0] == 0.0 and pts[-1] == pytest.approx(1.0)
    assert len(pts) == 9
    for p in pts:
        assert p / 0.01 == pytest.approx(round(p / 0.01), abs=1e-9), p


def test_search_space_grid_covers_every_knob():
    grid = get_system("llmstation").search_space().grid(max_points=5)
    assert grid["forward_tasklets"] == list(range(1, 34))
    assert grid["forward_wait_s"] == pytest.approx([0.0, 0.0125, 0.025, 0.0375, 0.05])


# ---------------------------------------------------------------- defaults and distributions


def test_defaults_are_the_artifacts_values():
    assert get_system("llmstation").search_space().defaults() == {
        "forward_tasklets": 8, "forward_wait_s": 0.005, "backward_tasklets": 8, "backward_wait_s": 0.005}
    assert get_system("vllm-torchtune").search_space().defaults() == {"mps_active_thread_pct": 80}


def test_defaults_are_clipped_into_the_range():
    space = apply_ranges("sys", KNOBS, {"mps_active_thread_pct": {"low": 10, "high": 50, "step": 5},
                                         "forward_wait_s": {"low": 0.01, "high": 0.05}}, "t")
    d = space.defaults()
    assert d == {"mps_active_thread_pct": 50, "forward_wait_s": 0.01}
    assert isinstance(d["mps_active_thread_pct"], int) and isinstance(d["forward_wait_s"], float)


def test_distribution_types():
    space = apply_ranges("sys", KNOBS, {"mps_active_thread_pct": {"low": 10, "high": 100, "step": 5},
                                         "forward_wait_s": {"low": 0.001, "high": 0.05, "log": True}}, "t")
    dists = space.distributions()
    pct, wait = dists["mps_active_thread_pct"], dists["forward_wait_s"]
    assert isinstance(pct, optuna.distributions.IntDistribution)
    assert (pct.low, pct.high, pct.step, pct.log) == (10, 100, 5, False)
    assert isinstance(wait, optuna.distributions.FloatDistribution)
    assert (wait.low, wait.high, wait.step, wait.log) == (0.001, 0.05, None, True)


def test_float_step_distribution_keeps_its_step():
    dist = _knob("float", 0.0, 0.05, step=0.01).distribution()
    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.step == 0.01


def test_describe_range():
    pct = get_system("vllm-torchtune").search_space()["mps_active_thread_pct"]
    assert pct.describe_range() == "10–100 %, step 5"
    assert get_system("fineinfer").search_space()["defer_s"].describe_range() == "0.001–1 s, log"


def test_search_space_lookup_of_an_unknown_knob():
    space = SearchSpace("sys", (), "t")
    with pytest.raises(KeyError):
        space["nosuch"]
