"""The GPU backend: what can be checked on the CPU, and one real study on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
import types
from dataclasses import replace

import pytest

from autotune.gpu.backend import GpuBackend, _trainer_failure, hardware_profile, prompt_seed
from autotune.gpu.server import Decision, ServerConfig
from autotune.metrics import RequestRecord
from autotune.models import from_name
from autotune.systems import get_system
from autotune.trial import TrialKind, TrialSpec
from autotune.workloads.spec import RequestSpec, Workload

WORKLOAD = Workload(tuple(RequestSpec(0.1 * i, 32, 4) for i in range(5)), 10.0, 0, True, "five requests")


def _spec(kind: TrialKind, seed: int, number: int | None = None, label: str | None = None) -> TrialSpec:
    """A spec as the study builds it (a serving-alone reference, trial ``number``, a confirmation run)."""
    system = get_system("llmstation")
    params = system.default_params()
    return TrialSpec(kind=kind, system=system.name, params=params, policy=system.policy(params),
                     model=from_name("llama-3.2-1b"), workload=WORKLOAD, seed=seed, number=number, label=label)


def _study_specs(seed: int, trials: int) -> list[TrialSpec]:
    """A study's runs with ``seed``: its reference, trials 0..trials-1 (trial n gets seed + n), a confirmation."""
    return ([_spec(TrialKind.SERVING_ALONE, seed)]
            + [_spec(TrialKind.COLOCATED, seed + n, number=n) for n in range(trials)]
            + [_spec(TrialKind.COLOCATED, seed + 1, label=f"confirm-0-seed{seed + 1}")])


@pytest.mark.parametrize("name, mib, profile", [
    ("NVIDIA H100 80GB HBM3", 81559, "h100-80gb"),
    ("NVIDIA H200", 143771, "h200"),  # a packaged profile: its figure rates apply
    ("NVIDIA A10G", 23028, "a10g-22gb"),
    ("NVIDIA GeForce RTX 3090", 24576, "rtx-3090-24gb"),
])
def test_hardware_profile_names(name, mib, profile):
    assert hardware_profile(name, mib) == profile


def test_trainer_failure_reasons(tmp_path):
    (tmp_path / "trainer-status.json").write_text(json.dumps({"state": "oom", "message": "trainer out of memory: 2 GiB"}))
    assert _trainer_failure(3, tmp_path) == "trainer out of memory: 2 GiB"
    (tmp_path / "trainer-status.json").write_text(json.dumps({"state": "error", "message": "ValueError: x"}))
    reason = _trainer_failure(1, tmp_path)
    assert reason.startswith("trainer exited with code 1: ValueError: x") and "trainer.log" in reason


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_prompt_seed_reference_and_trial_0_differ(seed):
    # the old seeds: both spec.seed, so trial 0 replayed the reference's prompts
    reference, trial_0 = _spec(TrialKind.SERVING_ALONE, seed), _spec(TrialKind.COLOCATED, seed, number=0)
    assert prompt_seed(reference) != prompt_seed(trial_0)
    assert prompt_seed(_spec(TrialKind.COLOCATED, seed, label="a")) != prompt_seed(
        _spec(TrialKind.COLOCATED, seed, label="b"))  # confirmation runs differ by label


def test_prompt_seed_counts_everything_that_names_the_run():
    base = _spec(TrialKind.COLOCATED, 3, number=3, label="x")
    others = [replace(base, kind=TrialKind.SERVING_ALONE), replace(base, seed=4), replace(base, number=4),
              replace(base, number=None), replace(base, label="y"), replace(base, label=None)]
    assert prompt_seed(base) not in {prompt_seed(spec) for spec in others}
    assert len({prompt_seed(spec) for spec in others}) == len(others)


def test_prompt_seed_warm_up_differs_from_every_run():
    runs = _study_specs(seed=0, trials=8000)  # the old warm-up seed, seed + 7919, was trial 7919's
    run_seeds = {prompt_seed(spec) for spec in runs}
    assert len(run_seeds) == len(runs)  # every run its own prompts
    assert not run_seeds & {prompt_seed(spec, warm_up=True) for spec in runs}


def test_prompt_seed_is_stable_and_fits_63_bits():
    specs = _study_specs(seed=7, trials=50)
    for spec in specs:
        seed = prompt_seed(spec)
        assert type(seed) is int and 0 <= seed <= 2**63 - 1
        assert 0 <= prompt_seed(spec, warm_up=True) <= 2**63 - 1
        assert prompt_seed(replace(spec, params=dict(spec.params))) == seed  # an equal spec, built again
    assert max(prompt_seed(s) for s in specs) >= 2**62  # the top bit of 63 is used (not a narrower hash)
    # the same in another interpreter (Python's own hash() differs between runs)
    code = ("import sys; sys.path[:0] = sys.argv[1:2]; from test_backend import _spec, TrialKind; "
            "from autotune.gpu.backend import prompt_seed; print(prompt_seed(_spec(TrialKind.COLOCATED, 3, number=3)))")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert int(out) == prompt_seed(_spec(TrialKind.COLOCATED, 3, number=3))


class _FakeServer:
    url = "http://127.0.0.1:1"
    config = ServerConfig(model="/m", served_model_name="llama-3.2-1b", dummy_weights=True, has_tokenizer=False)
    startup_s = 1.0
    log_path = "server.log"

    def is_alive(self) -> bool:
        return True

    def save_metrics(self, path: Path) -> bool:
        path.write_text("metrics\n")
        return True


def _cpu_backend(tmp_path, vllm_args: tuple[str, ...] = ()) -> GpuBackend:
    """A GpuBackend without its GPU checks: no MPS, a fresh server at every trial."""
    backend = object.__new__(GpuBackend)
    backend.root, backend.use_mps, backend._mps, backend._trials = tmp_path, False, None, 0
    backend.gpus, backend.gpu_mem_gb, backend._gpu, backend._gpu_mem_mib = 1, None, "NVIDIA H200", 143771
    backend.vllm_args, backend.finetune_data = vllm_args, None
    backend.keeper = types.SimpleNamespace(server=None, last_decision=Decision.START, last_started=None)
    return backend


def test_trials_references_and_warm_ups_send_prompt_seed(tmp_path, monkeypatch):
    """The backend's calls of replay_sync get ``prompt_seed``: a study's
    reference and its trial 0 (same spec.seed) no longer share prompts."""
    sent = []  # (workload description, seed)

    def replay_sync(url, workload, *, seed, **kw):
        sent.append((workload.description, seed))
        start_s = time.time()
        records = [RequestRecord(r.prompt_len, r.output_len, start_s + r.arrival_s,
                                 tuple(start_s + r.arrival_s + 0.01 * (k + 1) for k in range(r.output_len)))
                   for r in workload.requests]
        return types.SimpleNamespace(records=records, window_start_s=start_s, window_end_s=start_s + 1.0)

    monkeypatch.setitem(sys.modules, "autotune.gpu.loadgen", types.SimpleNamespace(replay_sync=replay_sync))
    backend = _cpu_backend(tmp_path)
    backend._server = lambda spec: _FakeServer()
    trainer = types.SimpleNamespace(first_exit=lambda: None, kill=lambda: None)
    backend._start_trainer = lambda spec, trial_dir, channel: trainer
    backend._stop_trainer = lambda ranks, channel, trial_dir: (trial_dir / "iterations.jsonl").write_text("")
    reference, trial_0 = _spec(TrialKind.SERVING_ALONE, 5), _spec(TrialKind.COLOCATED, 5, number=0)
    for spec in (reference, trial_0):
        result = backend.run_trial(spec)
        assert not result.crashed, result.error
    assert sent == [("warm-up", prompt_seed(reference, warm_up=True)), ("five requests", prompt_seed(reference)),
                    ("warm-up", prompt_seed(trial_0, warm_up=True)), ("five requests", prompt_seed(trial_0))]
    snapshots = [sorted(p.name for p in d.glob("server-metrics-*.prom")) for d in tmp_path.iterdir() if d.is_dir()]
    assert snapshots == [["server-metrics-after.prom", "server-metrics-before.prom"]] * 2  # around each measurement


def test_describe_records_the_server_flags_and_prefix_caching(tmp_path, monkeypatch):
    for name in ("torch", "vllm"):  # describe reads their versions; not installed on every CPU machine
        try:
            __import__(name)
        except ImportError:
            monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(__version__="0"))
    backend = _cpu_backend(tmp_path)
    before = backend.describe()
    assert before["server_flags"] is None and before["prefix_caching"] is False
    assert before["cpu"] and before["cpu"] != "unknown"  # the host: launch-bound trainer, CPU-bound API server
    assert _cpu_backend(tmp_path, ("--enable-prefix-caching",)).describe()["prefix_caching"] is True
    config = replace(_FakeServer.config, extra_args=("--enable-prefix-caching",), port=8123)
    backend.keeper.last_started = config  # a server ran, then was stopped: still recorded
    after = json.loads(json.dumps(backend.describe()))
    assert after["server_flags"] == config.flags() and after["prefix_caching"] is True
    assert "--port" not in after["server_flags"] and "/m" not in after["server_flags"]


@pytest.mark.gpu
def test_one_real_study_on_the_gpu(tmp_path):
    pytest.importorskip("vllm")
    from autotune.backends import make_backend
    from autotune.study import StudyConfig, run_study

    config = StudyConfig(system="llmstation", figure="fig8a", backend="gpu", rate_req_s=4.0, model="llama-3.2-1b",
                         sampler="random", trial_seconds=10.0, runs_dir=tmp_path)
    with make_backend("gpu", runs_dir=tmp_path) as backend:
        ctx = run_study(config, backend, n_trials=2)
    for t in ctx.study.trials:
        assert set(t.constraints) == {"ttft_p99", "tpot_p99"}
        assert t.user_attrs["outcome"] in ("feasible", "infeasible"), t.user_attrs.get("error")
        assert t.user_attrs["metrics"]["peft_samples_per_s"] > 0
        assert t.user_attrs["metrics"]["completed"] > 0


def test_identity_and_reference_cache_hold_every_choice_that_changes_a_measurement(tmp_path):
    plain = _cpu_backend(tmp_path)
    plain.use_mps = True
    plain.model_path = None
    assert plain.identity() == {"hardware": plain.hardware}  # as stored by studies before the choices were
    assert plain.cache_key() == "gpu:NVIDIA H200"
    flagged = _cpu_backend(tmp_path, ("--enable-prefix-caching",))
    flagged.use_mps, flagged.model_path = True, None
    no_mps = _cpu_backend(tmp_path)
    no_mps.use_mps, no_mps.model_path = False, None
    assert flagged.identity()["vllm_args"] == ["--enable-prefix-caching"] and no_mps.identity()["mps"] is False
    keys = {b.cache_key() for b in (plain, flagged, no_mps)}
    assert len(keys) == 3  # a reference measured with other server flags or without MPS is not reused
