"""The ``autotune`` command through Typer's CliRunner: the main job end to
end on the simulator, resume, ``show``, ``workload``, ``list``, bad input
(exit code 2, one line naming the problem, no traceback, no study data lost),
and a failing environment (exit code 1, one line, no trial left RUNNING)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from autotune.cli import app
from autotune.live import MAX_ROWS
from autotune.slo import CRASH_VIOLATION, PAPER_SLO_SOURCE
from autotune.systems import SYSTEMS, get_system
from autotune.testing.records import made_up_metrics

from tests.sim.test_profile import CARRIED

# Not a terminal, whatever the environment says: plain lines, no colour codes.
runner = CliRunner(env={"FORCE_COLOR": None, "TTY_COMPATIBLE": None, "TTY_INTERACTIVE": None})

BASE_STUDY = "llmstation-fig8a-6rps-sim"  # the default name: system, figure, preset rate (2x-rtx3090), backend
BASE_ARGS = ["llmstation", "--figure", "fig8a", "--trials", "3", "--num-prompts", "40"]
LLMSTATION_DEFAULTS = {"forward_tasklets": 8, "forward_wait_s": 0.005, "backward_tasklets": 8,
                       "backward_wait_s": 0.005}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # older Click mixes stderr into output
        return result.output


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


def user_error(result, *words: str, code: int = 2) -> str:
    """Exit code 2 and one line 'autotune: error: ...' holding ``words``; no traceback."""
    assert result.exit_code == code, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    lines = _stderr(result).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("autotune: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def env_error(result, *words: str) -> str:
    """Exit code 1 and one line 'autotune: error: ...' holding ``words``; no traceback."""
    return user_error(result, *words, code=1)


def snapshot(runs_dir: Path, name: str = BASE_STUDY) -> list:
    """Everything stored about a study: its attributes and every trial."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{runs_dir / 'studies.db'}")
    trials = [(t.number, t.state.name, t.params, t.values, t.user_attrs, t.system_attrs) for t in study.trials]
    return [study.user_attrs, trials]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One study of 3 trials, made once: (runs dir, CLI result, its --json document)."""
    runs = tmp_path_factory.mktemp("base") / "runs"
    result = ok(invoke(*BASE_ARGS, "--runs-dir", runs, "--json", runs / "out.json"))
    return runs, result, json.loads((runs / "out.json").read_text())


@pytest.fixture
def runs(base, tmp_path) -> Path:
    """A private copy of the base study's runs dir."""
    return Path(shutil.copytree(base[0], tmp_path / "runs"))


# ---------------------------------------------------------------- the main job


def test_list_names_every_system_its_ranges_and_every_figure():
    out = ok(invoke("list")).output
    for name in SYSTEMS:
        assert name in out
    for fig in ("fig8a", "fig9a", "fig10", "fig12", "fig13"):
        assert fig in out
    assert "mps_active_thread_pct 10–100 %, step 5 (default 80)" in out
    assert "defer_s 0.001–1 s, log (default 0.1)" in out


def test_list_shows_the_hardware_profiles_and_their_provenance():
    lines = ok(invoke("list")).output.splitlines()
    profiles = lines[lines.index("hardware profiles (--hardware; [how many numbers of each provenance]):") + 1:]
    named = {line.split()[0]: line for line in profiles if line.startswith("  ") and line[2] != " "}
    assert set(named) == {"2x-rtx3090", "h100-80gb", "h200", "h200-datasheet"}
    assert named["2x-rtx3090"].endswith("(default)") and "[26 carried over, 3 modelled, 2 spec]" in named["2x-rtx3090"]
    assert "NVIDIA H100 80GB HBM3 (79.18 GiB, NVLink 4): measured [14 fitted, 3 measured, 10 modelled, 4 spec]" \
        in named["h100-80gb"]
    assert "NVIDIA H200 (139.8 GiB, NVLink 4): modelled; measured sections carried over from h100-80gb " \
        "[23 carried over, 8 fitted]" in named["h200"]
    assert "NVIDIA H200 (139.8 GiB, NVLink 4): modelled; measured sections carried over from h100-80gb " \
        "[31 carried over]" in named["h200-datasheet"]


def test_end_to_end_json(base):
    _, _, doc = base
    assert doc["system"] == "llmstation" and doc["figure"] == "fig8a"
    assert doc["rate_req_s"] == 6.0 and doc["backend"] == "sim" and doc["model"] == "llama-3.1-8b"
    assert doc["num_prompts"] == 40 and doc["study_name"] == BASE_STUDY
    slo = doc["slo"]
    # The paper's SLOs by default: P99 TTFT 500 ms, P99 TPOT 50 ms for the 8B model.
    assert slo == {"ttft_p99_ms": 500.0, "tpot_p99_ms": 50.0, "ttft_basis": PAPER_SLO_SOURCE,
                   "tpot_basis": PAPER_SLO_SOURCE}
    ref = doc["reference"]
    assert ref["serving_alone"]["serving"]["ttft"]["p99_ms"] > 0  # still made: the PEFT/latency baseline
    assert ref["trainer_alone"]["peft"]["samples_per_s"] > 0 and ref["trainer_alone"]["serving"] is None
    info = doc["backend_info"]
    assert (info["hardware"], info["gpus"], info["profile_status"]) == ("2x-rtx3090", 2, "modelled")
    trials = doc["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2]
    for t in trials:
        assert {"number", "state", "params", "metrics", "constraints"} <= set(t)
        assert t["state"] == "COMPLETE" and set(t["constraints"]) == {"ttft_p99", "tpot_p99"}
        assert t["metrics"]["serving"]["completed"] == 40 and t["metrics"]["peft"]["samples_per_s"] > 0
        assert t["metrics"]["backend"]["sim_events"] > 0  # the backend's own figures, apart
    assert trials[0]["params"] == LLMSTATION_DEFAULTS  # the artifact's example first
    best = doc["best"]  # the simulator without noise is deterministic: this study has a feasible trial
    assert best is not None and best["feasible"] is True
    serving = best["metrics"]["serving"]
    assert serving["ttft"]["p99_ms"] <= slo["ttft_p99_ms"] and serving["tpot"]["p99_ms"] <= slo["tpot_p99_ms"]
    feasible = [t for t in trials if all(v <= 0 for v in t["constraints"].values())]
    assert best["metrics"]["peft"]["samples_per_s"] == max(t["metrics"]["peft"]["samples_per_s"] for t in feasible)


def test_output_is_plain_lines_when_not_a_terminal(base):
    runs, result, doc = base
    lines = result.output.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("trial ")] == ["trial 0", "trial 1", "trial 2"]
    assert lines[0].startswith(f"study {BASE_STUDY}: llmstation fig8a 6 req/s (2x-rtx3090 preset)")
    # the machine, and that its numbers are modelled (carried over from the H100), not measured
    assert lines[1].startswith("simulated 2x-rtx3090: 2x NVIDIA GeForce RTX 3090 (23.69 GiB, PCIe 4.0 x16): "
                               "modelled; measured sections carried over from h100-80gb")
    assert any(line.startswith("workload: 40 requests; synthetic") for line in lines)
    assert "\x1b[" not in result.output and "│" not in result.output
    assert any(line.startswith(f"best (trial {doc['best']['number']}): ") for line in lines)  # one is feasible
    assert lines[-1] == f"results written to {runs / 'out.json'}"


def test_the_same_command_resumes_the_study(runs, tmp_path):
    out = tmp_path / "again.json"
    result = ok(invoke(*BASE_ARGS, "--runs-dir", runs, "--json", out))
    assert "3 trials (3 already)" in result.output
    assert "reference serving alone (cached)" in result.output
    doc = json.loads(out.read_text())
    assert [t["number"] for t in doc["trials"]] == [0, 1, 2, 3, 4, 5]
    assert doc["trials"][0]["params"] == LLMSTATION_DEFAULTS
    assert doc["trials"][3]["params"] != LLMSTATION_DEFAULTS  # the example is enqueued once only


def test_confirm_reruns_the_best_on_fresh_workloads(runs, tmp_path):
    out = tmp_path / "confirmed.json"
    result = ok(invoke(*BASE_ARGS, "--trials", 1, "--confirm", 2, "--runs-dir", runs, "--json", out))
    doc = json.loads(out.read_text())
    conf = doc["confirmation"]
    assert conf["workloads"] == 2 and len(doc["trials"]) == 4  # confirmation adds no trials
    best = doc["best"]
    assert best is not None  # deterministic (no noise); with no best there is nothing to confirm
    first = conf["runs"][str(best["number"])]  # the best is always tried first
    assert [r["workload_seed"] for r in first] == [1_000_001, 1_000_002][:len(first)]
    assert all(set(r["constraints"]) == {"ttft_p99", "tpot_p99"} for rs in conf["runs"].values() for r in rs)
    lines = result.output.splitlines()
    assert any(line.startswith(f"confirm #{best['number']} on workload seed 1000001: P99 TTFT") for line in lines)
    assert "confirmation on 2 fresh workloads (same SLO in ms):" in lines
    # 40 prompts at 6 req/s: the fresh workloads' P99 TPOT lands near 65 ms, above the 50 ms the
    # study's own workload met, so no setting holds (the recommending path: tests/test_confirm.py)
    assert conf["recommended"] is None
    assert all(r["outcome"] == "infeasible" for rs in conf["runs"].values() for r in rs)
    assert "no setting met the SLO on all 2 fresh workloads; rerun with more --trials, or loosen the SLO" in lines


def test_two_simulated_h100s(tmp_path):
    out = tmp_path / "out.json"
    result = ok(invoke("llmstation", "--hardware", "h100-80gb", "--gpus", 2, "--trials", 1, "--num-prompts", 10,
                       "--runs-dir", tmp_path, "--json", out))
    doc = json.loads(out.read_text())
    assert doc["study_name"] == "llmstation-fig8a-12rps-sim" and doc["rate_req_s"] == 12.0  # the H100's rate
    info = doc["backend_info"]
    assert (info["hardware"], info["gpus"], info["gpu"]) == ("h100-80gb", 2, "NVIDIA H100 80GB HBM3")
    assert "simulated h100-80gb: 2x NVIDIA H100 80GB HBM3 (79.18 GiB, NVLink 4): measured" in result.output
    assert doc["trials"][0]["state"] == "COMPLETE"


def test_a_profile_file_of_ones_own(tmp_path):
    mine = _write(tmp_path / "mine.toml", PROFILE_FILE)
    out = tmp_path / "out.json"
    result = ok(invoke("vllm-torchtune", "--profile", mine, "--trials", 1, "--num-prompts", 10,
                       "--runs-dir", tmp_path, "--json", out))
    doc = json.loads(out.read_text())
    info = doc["backend_info"]
    assert (info["hardware"], info["gpus"], info["profile"]) == ("my-gpu", 1, str(mine))
    assert doc["rate_req_s"] == 6.0  # no rate of its own: the artifact's
    assert "fig8a 6 req/s (2x-rtx3090 preset)" in result.output


@pytest.mark.parametrize("system", [s for s in SYSTEMS if s != "llmstation"])
def test_each_system_on_fig8a(tmp_path, system):
    out = tmp_path / "out.json"
    ok(invoke(system, "--figure", "fig8a", "--trials", 2, "--num-prompts", 20, "--runs-dir", tmp_path,
              "--json", out))
    doc = json.loads(out.read_text())
    assert doc["system"] == system and len(doc["trials"]) == 2
    assert doc["trials"][0]["params"] == get_system(system).search_space().defaults()
    assert all(set(t["constraints"]) == {"ttft_p99", "tpot_p99"} for t in doc["trials"])


def test_grid_sampler_on_vllm_torchtune(tmp_path):
    out = tmp_path / "out.json"
    ok(invoke("vllm-torchtune", "--sampler", "grid", "--trials", 3, "--num-prompts", 20, "--runs-dir", tmp_path,
              "--json", out))
    pcts = [t["params"]["mps_active_thread_pct"] for t in json.loads(out.read_text())["trials"]]
    assert len(set(pcts)) == 3
    assert all(p in range(10, 101, 5) for p in pcts)


def test_gp_sampler(tmp_path):
    # 9 trials: the example, 7 random, then one the Gaussian process proposes.
    out = tmp_path / "out.json"
    result = ok(invoke("vllm-torchtune", "--sampler", "gp", "--trials", 9, "--num-prompts", 10,
                       "--runs-dir", tmp_path, "--json", out))
    assert "sampler gp" in result.output
    trials = json.loads(out.read_text())["trials"]
    assert len(trials) == 9 and all(t["state"] == "COMPLETE" for t in trials)


def test_fig12_trains_without_serving(tmp_path):
    out = tmp_path / "out.json"
    result = ok(invoke("llmstation", "--figure", "fig12", "--trials", 2, "--runs-dir", tmp_path, "--json", out))
    assert "no serving" in result.output
    doc = json.loads(out.read_text())
    assert doc["slo"] is None and "serving_alone" not in doc["reference"]
    for t in doc["trials"]:
        assert t["metrics"]["serving"] is None and t["metrics"]["peft"]["samples_per_s"] > 0
    assert doc["best"] is not None  # nothing to violate without serving


@pytest.mark.parametrize("system", ["vllm-torchtune", "chunked", "fineinfer"])
def test_fig12_is_for_llmstation_only(tmp_path, system):
    user_error(invoke(system, "--figure", "fig12", "--runs-dir", tmp_path), "fig12 is for llmstation only")
    assert not (tmp_path / "studies.db").exists()


def test_fig13_with_skewed_adapters_of_rank_16(tmp_path):
    out = tmp_path / "out.json"
    ok(invoke("llmstation", "--figure", "fig13", "--lora-dist", "skewed", "--lora-rank", 16, "--trials", 2,
              "--num-prompts", 20, "--runs-dir", tmp_path, "--json", out))
    doc = json.loads(out.read_text())
    assert doc["study_name"] == "llmstation-fig13-0.88rps-lora-skewed-r16-sim"  # the paper's rate
    assert "adapters skewed" in doc["workload"] and len(doc["trials"]) == 2


def test_show(base, tmp_path):
    runs, _, doc = base
    out = tmp_path / "show.json"
    result = ok(invoke("show", BASE_STUDY, "--runs-dir", runs, "--json", out, "--pareto"))
    shown = json.loads(out.read_text())
    assert shown["trials"] == doc["trials"] and shown["best"] == doc["best"]
    text = result.output
    assert "P99 TPOT ms" in text and "forward_tasklets" in text  # the table
    assert f"study {BASE_STUDY}: 3 trials" in text
    for label in ("P99 TTFT", "P99 TPOT"):
        curve_lines = text.split(f"trade-off curve ({label} ms vs PEFT samples/s, feasible or not):\n")[1]
        curve_lines = curve_lines.split("trade-off curve (")[0]  # this curve's lines only, not the next curve's
        curve = [line for line in curve_lines.splitlines() if line.startswith("  #")]
        assert 1 <= len(curve) <= 3
    assert "Pareto" not in text  # a study of one objective has no Pareto-optimal column


def test_show_lists_every_trial_of_a_long_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="long", storage=storage, direction="maximize")
    study.set_user_attr("config", {"system": "vllm-torchtune", "figure": "fig8a", "rate_req_s": 2.0,
                                   "backend": {"backend": "sim"}})
    study.set_user_attr("slo", {"ttft_p99_ms": 60.0, "tpot_p99_ms": 12.0, "ttft_basis": "absolute",
                                "tpot_basis": "absolute"})
    dist = optuna.distributions.IntDistribution(1, 100)
    assert 30 > MAX_ROWS  # more trials than the live view shows
    for i in range(30):
        study.add_trial(optuna.trial.create_trial(
            value=i / 100, params={"mps_active_thread_pct": i + 1}, distributions={"mps_active_thread_pct": dist},
            user_attrs={"outcome": "feasible", "metrics": made_up_metrics(i / 100, 50.0, 8.0 + i / 100).to_dict()},
            constraints={"ttft_p99": -0.1, "tpot_p99": -0.1}))
    text = ok(invoke("show", "long", "--storage", storage, "--pareto")).output
    numbers = {int(line.split("│")[1]) for line in text.splitlines() if line.count("│") > 3
               and line.split("│")[1].strip().isdigit()}
    assert numbers == set(range(30))  # the whole study, not the live view's last rows
    assert "best (trial 29): mps_active_thread_pct=30" in text
    # Every trial trades 0.01 ms of TPOT for 0.01 samples/s: all 30 are on the
    # TPOT curve; their TTFT is the same, so only the fastest is on the TTFT one.
    ttft, tpot = text.split("trade-off curve (P99 TTFT")[1].split("trade-off curve (P99 TPOT")
    assert sum(line.startswith("  #") for line in ttft.splitlines()) == 1
    assert sum(line.startswith("  #") for line in tpot.splitlines()) == 30


def test_show_unknown_study_or_database(base, tmp_path):
    user_error(invoke("show", "nosuch", "--runs-dir", base[0]), "no study named 'nosuch'")
    user_error(invoke("show", BASE_STUDY, "--runs-dir", tmp_path / "empty"), "no study database")


# ---------------------------------------------------------------- workload


def test_workload_fig9a(tmp_path):
    out = tmp_path / "w.jsonl"
    result = ok(invoke("workload", "fig9a", "--rate", 4, "--num-prompts", 50, "--out", out))
    assert "synthetic" in result.output
    reqs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(reqs) == 50
    assert all(set(r) == {"arrival_s", "prompt_len", "output_len", "adapter"} for r in reqs)
    assert reqs[0]["arrival_s"] == 0.0
    assert all(a["arrival_s"] <= b["arrival_s"] for a, b in zip(reqs, reqs[1:]))
    assert all(r["adapter"] is None and r["prompt_len"] >= 1 and r["output_len"] >= 1 for r in reqs)


def test_workload_fig9a_from_a_burstgpt_file(tmp_path):
    """Data rows 0..5200 are skipped, GPT-4 rows too; the ChatGPT gaps (1 s, 3 s, 1 s, ...)
    are scaled by one factor to a mean of 1/4 s, so the bursts keep their shape."""
    header = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    rows = [f"{i * 0.5},ChatGPT,10,10,20,Conversation log\n" for i in range(5201)]
    t = 10_000.0
    for i in range(51):
        rows.append(f"{t},ChatGPT,10,10,20,Conversation log\n")
        rows.append(f"{t + 0.1},GPT-4,10,10,20,Conversation log\n")
        t += 1.0 if i % 2 == 0 else 3.0
    trace = _write(tmp_path / "BurstGPT.csv", header + "".join(rows))
    out = tmp_path / "w.jsonl"
    result = ok(invoke("workload", "fig9a", "--rate", 4, "--num-prompts", 50, "--burstgpt", trace, "--out", out))
    assert "BurstGPT.csv" in result.output
    arrivals = [json.loads(line)["arrival_s"] for line in out.read_text().splitlines()]
    assert len(arrivals) == 50 and arrivals[0] == 0.0
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert gaps[:4] == pytest.approx([0.125, 0.375, 0.125, 0.375])  # 1 s : 3 s, mean 0.25 s
    assert arrivals[-1] == pytest.approx(12.125)  # 24 x (0.125 + 0.375) + 0.125


def test_workload_is_the_same_for_the_same_seed(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    for path, seed in ((a, 3), (b, 3), (c, 4)):
        ok(invoke("workload", "fig8a", "--rate", 2, "--num-prompts", 20, "--seed", seed, "--out", path))
    assert a.read_text() == b.read_text() != c.read_text()


def test_workload_rate_and_prompts_follow_the_hardware_and_the_system(tmp_path):
    out = tmp_path / "w.jsonl"
    result = ok(invoke("workload", "fig8a", "--out", out))  # the default profile's 6 req/s x 200 prompts
    assert "Poisson arrivals at 6 req/s" in result.output and len(out.read_text().splitlines()) == 1200
    result = ok(invoke("workload", "fig8a", "--hardware", "h100-80gb", "--num-prompts", 10, "--out", out))
    assert "Poisson arrivals at 12 req/s" in result.output
    ok(invoke("workload", "fig8a", "--rate", 0.1, "--system", "fineinfer", "--out", out))
    assert len(out.read_text().splitlines()) == 40  # FineInfer: 400 prompts per req/s
    ok(invoke("workload", "fig8a", "--rate", 0.1, "--out", out))
    assert len(out.read_text().splitlines()) == 20
    user_error(invoke("workload", "fig8a", "--system", "nope", "--out", tmp_path / "x.jsonl"),
               "unknown system 'nope'", "llmstation")


def test_workload_fig13_uniform_adapters(tmp_path):
    out = tmp_path / "w.jsonl"
    ok(invoke("workload", "fig13", "--lora-dist", "uniform", "--num-prompts", 20, "--out", out))
    adapters = [json.loads(line)["adapter"] for line in out.read_text().splitlines()]
    assert adapters == [i % 8 for i in range(20)]


@pytest.mark.parametrize("args, words", [
    (["fig12"], ["fig12 has no serving workload"]),
    (["fig8a", "--lora-dist", "skewed"], ["--lora-dist applies to fig13 only"]),
    (["fig8a", "--num-prompts", 0], ["number of prompts", "got 0"]),
    (["fig8a", "--rate", -1], ["rate", "got -1"]),
    (["fig99"], ["fig99"]),
])
def test_workload_bad_input(tmp_path, args, words):
    out = tmp_path / "w.jsonl"
    user_error(invoke("workload", *args, "--out", out), *words)
    assert not out.exists()


def test_workload_into_a_missing_folder(tmp_path):
    user_error(invoke("workload", "fig8a", "--num-prompts", 5, "--out", tmp_path / "nodir" / "w.jsonl"),
               "cannot write", "No such file or directory")


# ---------------------------------------------------------------- bad input


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


PROFILE_FILE = CARRIED  # a profile of its own that carries the H100's measured numbers

LLMSTATION_SPACE = """
[forward_tasklets]
low = 1
high = 33
[forward_wait_s]
low = {wait_low}
high = 0.05
[backward_tasklets]
low = 1
high = 33
[backward_wait_s]
low = 0.0
high = 0.05
"""


def _bad_inputs(tmp: Path) -> dict[str, tuple[list, list[str]]]:
    """name -> (arguments, words the one-line error must hold)."""
    sharegpt_bad = _write(tmp / "sharegpt.json", '[{"id": "a", "conversations": [')
    burstgpt_bad = _write(tmp / "burstgpt.csv", "Time,Model\n1.0,ChatGPT\n")
    return {
        "unknown system": (["nosuch"], ["No such command 'nosuch'", "llmstation", "vllm-torchtune"]),
        "unknown figure": (["llmstation", "--figure", "fig99"], ["--figure", "fig99", "fig8a"]),
        "unknown sampler": (["llmstation", "--sampler", "bayes"], ["--sampler", "bayes", "tpe"]),
        "unknown backend": (["llmstation", "--backend", "cloud"], ["--backend", "cloud", "sim"]),
        "toml syntax": (["llmstation", "--search-space", _write(tmp / "syntax.toml", "[forward_tasklets]\nlow = \n")],
                        ["malformed search-space file", "syntax.toml"]),
        "unknown knob": (["vllm-torchtune", "--search-space",
                          _write(tmp / "knob.toml", "[mps_pct]\nlow = 10\nhigh = 100\n")],
                         ["unknown knob(s) mps_pct for vllm-torchtune", "mps_active_thread_pct"]),
        "low above high": (["vllm-torchtune", "--search-space",
                            _write(tmp / "order.toml", "[mps_active_thread_pct]\nlow = 90\nhigh = 20\n")],
                           ["low 90 is above high 20"]),
        "mps above 100": (["vllm-torchtune", "--search-space",
                           _write(tmp / "mps.toml", "[mps_active_thread_pct]\nlow = 10\nhigh = 120\n")],
                          ["mps_active_thread_pct", "10–120", "physical limits 1–100 %"]),
        "negative wait": (["llmstation", "--search-space",
                           _write(tmp / "wait.toml", LLMSTATION_SPACE.format(wait_low=-0.01))],
                          ["forward_wait_s", "-0.01", "physical limits 0–10 s"]),
        "missing search space": (["llmstation", "--search-space", tmp / "nosuch.toml"],
                                 ["cannot read search-space file", "nosuch.toml"]),
        "missing sharegpt": (["llmstation", "--sharegpt", tmp / "nosuch.json"], ["ShareGPT file not found"]),
        "malformed sharegpt": (["llmstation", "--sharegpt", sharegpt_bad], ["ShareGPT file", "not readable JSON"]),
        "missing burstgpt": (["llmstation", "--figure", "fig9a", "--burstgpt", tmp / "nosuch.csv"],
                             ["BurstGPT file not found"]),
        "malformed burstgpt": (["llmstation", "--figure", "fig9a", "--burstgpt", burstgpt_bad],
                               ["BurstGPT file", "missing column(s)", "Timestamp"]),
        "storage url": (["llmstation", "--storage", "nosuch://x"], ["unusable storage URL 'nosuch://x'"]),
        "trials 0": (["llmstation", "--trials", 0], ["--trials"]),
        "negative rate": (["llmstation", "--rate", -1], ["--rate must be a positive number", "-1"]),
        "zero prompts": (["llmstation", "--num-prompts", 0], ["--num-prompts must be at least 1"]),
        "lora-dist on fig8a": (["llmstation", "--figure", "fig8a", "--lora-dist", "skewed"],
                               ["--lora-dist applies to fig13 only, not fig8a"]),
        "lora rank": (["llmstation", "--figure", "fig13", "--lora-rank", 12], ["--lora-rank", "8, 16, 32", "12"]),
        "negative slo": (["llmstation", "--slo-ttft-ms", -5], ["ttft_p99_ms must be positive"]),
        "unknown model": (["llmstation", "--model", "gpt-9"], ["unknown model preset 'gpt-9'", "llama-3.1-8b"]),
        "other settings": (["llmstation", "--figure", "fig8a", "--trials", 1, "--num-prompts", 30,
                            "--study-name", BASE_STUDY], [f"study '{BASE_STUDY}' exists with other settings"]),
        "other slo": ([*BASE_ARGS, "--slo-tpot-ms", 40], [f"study '{BASE_STUDY}' was run with other SLOs"]),
        "other ratio": ([*BASE_ARGS, "--slo-ttft-ratio", 2], [f"study '{BASE_STUDY}' was run with other SLOs"]),
        "slo ms and ratio": (["llmstation", "--slo-tpot-ms", 40, "--slo-tpot-ratio", 1.5],
                             ["give --slo-tpot-ms or --slo-tpot-ratio, not both"]),
        "other hardware": ([*BASE_ARGS, "--hardware", "h100-80gb", "--gpus", 2, "--rate", 6],
                           [f"study '{BASE_STUDY}' exists with other settings (hardware, profile_digest)"]),
        "other gpus": ([*BASE_ARGS, "--gpus", 1], [f"study '{BASE_STUDY}' exists with other settings (gpus, "
                                                   "profile_digest)"]),
        "other noise": ([*BASE_ARGS, "--noise", 0.1], [f"study '{BASE_STUDY}' exists with other settings (noise)"]),
        "other warm-up": ([*BASE_ARGS, "--warmup-s", 2], [f"study '{BASE_STUDY}' exists with other settings "
                                                          "(warmup_s)"]),
        "unknown hardware": (["llmstation", "--hardware", "nope"],
                             ["unknown hardware profile 'nope'", "2x-rtx3090, h100-80gb, h200"]),
        "hardware and profile": (["llmstation", "--hardware", "h100-80gb", "--profile", tmp / "x.toml"],
                                 ["give --hardware NAME or --profile FILE, not both"]),
        "missing profile": (["llmstation", "--profile", tmp / "x.toml"], ["simulator profile", "does not exist"]),
        "gpus 0": (["llmstation", "--gpus", 0], ["--gpus must be at least 1, got 0"]),
        "noise on gpu": (["llmstation", "--backend", "gpu", "--noise", 0.1],
                         ["--noise applies to --backend sim, not gpu"]),
        "hardware on gpu": (["llmstation", "--backend", "gpu", "--hardware", "h100-80gb"],
                            ["--hardware applies to --backend sim, not gpu"]),
        "no-mps on sim": (["llmstation", "--no-mps"], ["--no-mps applies to --backend gpu, not sim"]),
        "gpu-mem-gb on sim": (["llmstation", "--gpu-mem-gb", 24], ["--gpu-mem-gb applies to --backend gpu, not sim"]),
        "vllm-arg on sim": (["llmstation", "--vllm-arg", "--enforce-eager"],
                            ["--vllm-arg applies to --backend gpu, not sim"]),
        "negative confirm": (["llmstation", "--confirm", -1], ["--confirm"]),
        "confirm without serving": (["llmstation", "--figure", "fig12", "--confirm", 2],
                                    ["--confirm", "fig12 serves nothing"]),
        # fig12 trains only: NumPy met the seed first, in the sampler (a traceback)
        "seed above 2**32-1": (["llmstation", "--figure", "fig12", "--seed", 2**32],
                               ["--seed must be in 0..4294967295", "got 4294967296"]),
        "negative seed": (["llmstation", "--figure", "fig12", "--seed", -1], ["--seed must be in 0..4294967295"]),
        "tokenizer without sharegpt": (["llmstation", "--tokenizer", tmp / "nosuch.json"],
                                       ["--tokenizer", "give --sharegpt FILE too"]),
    }


BAD_INPUT_NAMES = [
    "unknown system", "unknown figure", "unknown sampler", "unknown backend", "toml syntax", "unknown knob",
    "low above high", "mps above 100", "negative wait", "missing search space", "missing sharegpt",
    "malformed sharegpt", "missing burstgpt", "malformed burstgpt", "storage url", "trials 0", "negative rate",
    "zero prompts", "lora-dist on fig8a", "lora rank", "negative slo", "unknown model", "other settings",
    "other slo", "negative confirm", "confirm without serving", "other ratio", "slo ms and ratio",
    "other hardware", "other gpus", "other noise", "other warm-up", "unknown hardware", "hardware and profile", "missing profile",
    "gpus 0", "noise on gpu", "hardware on gpu", "no-mps on sim", "gpu-mem-gb on sim", "vllm-arg on sim",
    "seed above 2**32-1", "negative seed", "tokenizer without sharegpt",
]


def _studies(runs_dir: Path) -> list[str]:
    return sorted(optuna.get_all_study_names(f"sqlite:///{runs_dir / 'studies.db'}"))


@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_bad_input_is_one_line_exit_2_and_loses_nothing(runs, tmp_path, name):
    args, words = _bad_inputs(tmp_path)[name]
    before = snapshot(runs)
    studies = _studies(runs)
    user_error(invoke(*args, "--runs-dir", runs), *words)
    assert snapshot(runs) == before
    assert _studies(runs) == studies  # and no new, empty study beside it


def test_bad_input_cases_are_all_run(tmp_path):
    assert sorted(BAD_INPUT_NAMES) == sorted(_bad_inputs(tmp_path))


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path):
    notes = _write(tmp_path / "notes.db", "my notes, not a database\n")
    user_error(invoke("llmstation", "--storage", f"sqlite:///{notes}", "--runs-dir", tmp_path / "runs"),
               "is not an SQLite database")
    assert notes.read_bytes() == b"my notes, not a database\n"


def _json_targets(tmp: Path, runs: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (--json PATH, words the one-line error must hold)."""
    (tmp / "a-folder").mkdir()
    _write(tmp / "a-file", "mine\n")
    return {
        "missing folder": (tmp / "nodir" / "out.json", ["--json", "folder", "nodir does not exist"]),
        "onto a folder": (tmp / "a-folder", ["--json", "a-folder is a folder"]),
        "under a file": (tmp / "a-file" / "out.json", ["--json", "a-file is not a folder"]),
        "the study database": (runs / "studies.db", ["--json", "is the study database"]),
    }


JSON_TARGETS = ["missing folder", "onto a folder", "under a file", "the study database"]


@pytest.mark.parametrize("name", JSON_TARGETS)
def test_an_unwritable_json_path_is_refused_before_the_first_trial(runs, tmp_path, name):
    path, words = _json_targets(tmp_path, runs)[name]
    before, files = snapshot(runs), {p: p.read_bytes() for p in runs.iterdir()}
    result = invoke(*BASE_ARGS, "--trials", 1, "--runs-dir", runs, "--json", path)
    user_error(result, *words)
    assert result.stdout == ""  # no reference run, no trial: the error comes first
    assert snapshot(runs) == before and {p: p.read_bytes() for p in runs.iterdir()} == files
    assert (tmp_path / "a-file").read_text() == "mine\n" and list((tmp_path / "a-folder").iterdir()) == []


@pytest.mark.parametrize("name", JSON_TARGETS)
def test_show_refuses_an_unwritable_json_path(runs, tmp_path, name):
    path, words = _json_targets(tmp_path, runs)[name]
    files = {p: p.read_bytes() for p in runs.iterdir()}
    result = invoke("show", BASE_STUDY, "--runs-dir", runs, "--json", path)
    user_error(result, *words)
    assert result.stdout == ""  # refused before the table
    assert {p: p.read_bytes() for p in runs.iterdir()} == files


def _read_only(monkeypatch, folder: Path) -> None:
    """``folder`` reads as not writable. The tests run as root, for whom
    os.access says every folder is writable whatever its mode, so a chmod
    alone would test nothing: os.access itself is patched."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path).resolve() == folder.resolve() and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    folder.chmod(0o555)  # what a user who is not root meets
    monkeypatch.setattr(os, "access", access)


def test_json_into_a_read_only_folder_is_exit_1_before_the_first_trial(runs, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    before = snapshot(runs)
    result = invoke(*BASE_ARGS, "--trials", 1, "--runs-dir", runs, "--json", ro / "out.json")
    env_error(result, "--json", f"folder {ro} is not writable")
    assert result.stdout == "" and snapshot(runs) == before
    result = invoke("show", BASE_STUDY, "--runs-dir", runs, "--json", ro / "out.json")
    env_error(result, "--json", f"folder {ro} is not writable")
    assert result.stdout == ""
    ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_a_read_only_runs_dir_is_exit_1_before_anything_is_stored(runs, monkeypatch):
    _read_only(monkeypatch, runs)
    before, files = snapshot(runs), {p: p.read_bytes() for p in runs.iterdir()}
    result = invoke(*BASE_ARGS, "--trials", 1, "--num-prompts", 30, "--runs-dir", runs)  # a new study
    env_error(result, "--runs-dir", f"folder {runs} is not writable")
    assert result.stdout == ""
    runs.chmod(0o755)
    assert snapshot(runs) == before and {p: p.read_bytes() for p in runs.iterdir()} == files


@pytest.mark.parametrize("storage", [False, True])
def test_a_runs_dir_that_is_a_file_is_refused_and_no_study_is_made(tmp_path, storage):
    notes = _write(tmp_path / "notes", "mine\n")
    db = tmp_path / "elsewhere.db"
    args = ["--storage", f"sqlite:///{db}"] if storage else []
    user_error(invoke(*BASE_ARGS, "--trials", 1, *args, "--runs-dir", notes), f"--runs-dir {notes} is a file")
    user_error(invoke(*BASE_ARGS, "--trials", 1, *args, "--runs-dir", notes / "sub"),
               f"--runs-dir {notes / 'sub'}: {notes} is a file")
    assert notes.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no database, no study anywhere


def test_the_largest_seed_runs_and_resumes(tmp_path):
    args = ["llmstation", "--figure", "fig12", "--trials", 1, "--seed", 2**32 - 1, "--runs-dir", tmp_path]
    ok(invoke(*args))
    ok(invoke(*args))  # the sampler's seed on resume, seed + 1000 x trials, wraps round


def test_workload_tokenizer_without_sharegpt(tmp_path):
    out = tmp_path / "w.jsonl"
    user_error(invoke("workload", "fig8a", "--tokenizer", tmp_path / "tokenizer.json", "--out", out),
               "--tokenizer", "give --sharegpt FILE too")
    assert not out.exists()


def test_a_disk_that_fills_before_the_json_is_written_is_exit_1_and_keeps_the_trials(runs, tmp_path, monkeypatch):
    import pathlib

    out = _write(tmp_path / "out.json", '{"old": true}\n')
    real = pathlib.Path.write_text

    def write_text(self, text, *args, **kwargs):
        if self.name == ".out.json.tmp":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    result = invoke(*BASE_ARGS, "--trials", 1, "--runs-dir", runs, "--json", out)
    env_error(result, f"cannot write {out}", "No space left on device")
    assert f"study {BASE_STUDY}: 4 trials" in result.stdout  # the answer is printed first
    assert len(snapshot(runs)[1]) == 4  # and the trial is stored
    assert out.read_text() == '{"old": true}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "runs"]


def _no_running(runs: Path, name: str) -> list:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{runs / 'studies.db'}")
    assert all(t.state.name != "RUNNING" for t in study.trials), [t.state.name for t in study.trials]
    return study.trials


def test_a_full_disk_for_the_reference_cache_is_exit_1_and_keeps_the_cache(runs, monkeypatch):
    from autotune.study import ReferenceCache

    def disk_full(self, key, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path.with_suffix(".tmp")))

    monkeypatch.setattr(ReferenceCache, "put", disk_full)
    cache = (runs / "references.json").read_bytes()
    before = snapshot(runs)
    result = invoke(*BASE_ARGS, "--num-prompts", 30, "--study-name", "new", "--runs-dir", runs)  # new references
    env_error(result, f"cannot write {runs / 'references.json'}", "No space left on device")
    assert (runs / "references.json").read_bytes() == cache and snapshot(runs) == before
    assert _no_running(runs, "new") == []  # stopped before its first trial


def test_a_full_disk_during_a_trial_is_exit_1_and_the_trial_is_failed_with_constraints(runs, monkeypatch):
    from autotune.sim.backend import SimBackend
    from autotune.trial import TrialKind

    real = SimBackend.run_trial

    def run_trial(self, spec, progress=lambda f, s: None):  # as the GPU backend writing its trial logs
        if spec.kind is TrialKind.COLOCATED and spec.number == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(runs / "gpu" / "trial-4" / "server.log"))
        return real(self, spec, progress)

    monkeypatch.setattr(SimBackend, "run_trial", run_trial)
    result = invoke(*BASE_ARGS, "--runs-dir", runs)
    env_error(result, f"cannot write {runs / 'gpu' / 'trial-4' / 'server.log'}", "No space left on device")
    assert "trial 3:" in result.stdout  # the trial before it finished
    trials = _no_running(runs, BASE_STUDY)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4 + ["FAIL"]
    failed = trials[4]
    assert failed.constraints == {"ttft_p99": CRASH_VIOLATION, "tpot_p99": CRASH_VIOLATION}
    assert failed.user_attrs["outcome"] == "failed" and "No space left on device" in failed.user_attrs["error"]


def test_a_storage_that_fills_up_is_exit_1_and_leaves_no_trial_running(runs, monkeypatch):
    import sqlite3

    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError
    from optuna.storages import RDBStorage

    real = RDBStorage.set_trial_state_values
    full = []

    def set_trial_state_values(self, trial_id, state, values=None):
        # a full disk takes the FAIL (a row that is there) but not the first COMPLETE after trial 3
        if state.name == "COMPLETE" and self.get_trial(trial_id).number == 4 and not full:
            full.append(trial_id)
            try:
                raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, sqlite3.OperationalError(
                    "database or disk is full"))
            except sqlalchemy.exc.OperationalError as e:
                raise StorageInternalError("An exception is raised during the commit.") from e
        return real(self, trial_id, state, values)

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", set_trial_state_values)
    result = invoke(*BASE_ARGS, "--runs-dir", runs)
    env_error(result, "storage sqlite:///", "failed: database or disk is full")
    trials = _no_running(runs, BASE_STUDY)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4 + ["FAIL"]
    assert set(trials[4].constraints) == {"ttft_p99", "tpot_p99"}
    assert trials[4].user_attrs["outcome"] == "failed"  # never counted as the best, whatever it measured


def test_gpu_backend_without_vllm_is_one_line(tmp_path):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed: this checks a machine without it")
    line = user_error(invoke("llmstation", "--backend", "gpu", "--trials", 1, "--runs-dir", tmp_path),
                      "--backend gpu needs")
    assert "pip install" in line or "nvidia-smi" in line


def test_objective_pareto_lists_the_pareto_optimal_trials_and_refuses_another_objective(tmp_path):
    args = ["llmstation", "--figure", "fig10", "--trials", "3", "--num-prompts", "20", "--runs-dir", tmp_path]
    out = tmp_path / "pareto.json"
    text = ok(invoke(*args, "--objective", "pareto", "--json", out, "--plain")).output
    doc = json.loads(out.read_text())
    assert doc["study_name"] == "llmstation-fig10-0.88rps-pareto-sim" and doc["objective"] == "pareto"
    front = doc["pareto_optimal"]
    feasible = [t for t in doc["trials"] if t["outcome"] == "feasible"]
    assert front and len(front) <= len(feasible) and all(t["feasible"] for t in front)
    assert doc["best"]["number"] == front[0]["number"]  # the highest PEFT of the front is the study's best
    listed = text.split("Pareto-optimal feasible trials")[1].splitlines()[1:]
    assert [line.split(":")[0].strip() for line in listed if line.startswith("  #")] == \
        [f"#{t['number']}" for t in front]
    shown = ok(invoke("show", "llmstation-fig10-0.88rps-pareto-sim", "--runs-dir", tmp_path)).output
    cells = [line.split("│")[1:-1] for line in shown.splitlines() if line.startswith("│")]
    assert {int(c[0]) for c in cells if c[-2].strip() == "yes"} == {t["number"] for t in front}  # the Pareto column
    user_error(invoke(*args, "--study-name", "llmstation-fig10-0.88rps-pareto-sim"),
               "exists with other settings (objective)")
    user_error(invoke("llmstation", "--figure", "fig12", "--objective", "pareto", "--runs-dir", tmp_path),
               "fig12 serves nothing")
